"""The one model builder of the command line and the experiment, and the parsers they share."""
import argparse

import pytest
import torch.nn as nn

from tdconv.apps.models import build_model, is_resnet, parse_fraction, parse_input_size, parse_layers, parse_rank


def test_build_model_stems_and_channels():
    plain = build_model("resnet18", 10)
    assert plain.fc.out_features == 10 and plain.conv1.kernel_size == (7, 7)
    assert isinstance(plain.maxpool, nn.MaxPool2d)
    cifar = build_model("resnet18", 7, stem="cifar", in_channels=1)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and cifar.conv1.in_channels == 1
    assert isinstance(cifar.maxpool, nn.Identity) and cifar.fc.out_features == 7
    gray = build_model("resnet34", 10, stem="imagenet", in_channels=1)
    assert gray.conv1.in_channels == 1 and gray.conv1.kernel_size == (7, 7)
    assert build_model("mobilenet_v2", 5).classifier[-1].out_features == 5
    assert is_resnet("wide_resnet50_2") and not is_resnet("vgg11") and not is_resnet("resnet999")


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="resnet999", num_classes=10), "'resnet999' is not a torchvision model"),
    (dict(name="fasterrcnn_resnet50_fpn", num_classes=10), "is not a torchvision model"),
    (dict(name="resnet18", num_classes=0), "num_classes must be an int >= 1"),
    (dict(name="resnet18", num_classes=10, stem="tiny"), "stem must be one of"),
    (dict(name="vgg11", num_classes=10, stem="cifar"), "ResNets only, not to 'vgg11'"),
    (dict(name="resnet18", num_classes=10, in_channels=0), "in_channels must be an int >= 1"),
])
def test_build_model_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


def test_parsers():
    assert parse_rank("0.5") == 0.5 and parse_rank("64") == 64 and parse_rank("64,32") == (64, 32)
    assert parse_rank("evbmf") == "evbmf" and parse_rank("energy=0.9") == "energy=0.9"
    assert parse_fraction("1") == 1.0 and parse_input_size("1,28,28") == (1, 28, 28)
    assert parse_layers("all") is None and parse_layers("seed") == "seed" and parse_layers("a,b") == ["a", "b"]
    for parse, text, match in [(parse_rank, "half", "--rank must be"), (parse_fraction, "0", "fraction in"),
                               (parse_input_size, "3,32", "--input-size must be C,H,W")]:
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            parse(text)
