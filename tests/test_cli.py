import json
import os

import pytest
import torch
import torchvision

import tdconv
from tdconv.cli import main


def test_compress_and_report(require_ext, tmp_path, capsys):
    out, js = tmp_path / "small.pt", tmp_path / "report.json"
    assert main(["compress", "--model", "resnet18", "--num-classes", "10", "--method", "cp", "--rank", "0.5",
                 "--layers", "seed", "--bias", "--n-iter-max", "2", "--out", str(out), "--json", str(js),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "37.18 M -> 20.49 M" in text and "11.18 M -> 5.62 M" in text and "layer4.1.conv2" in text
    assert json.loads(js.read_text())["macs_after"] == 20489226
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rebuilt resnet18 from the file: 20.49 MMac, 5.62 M parameters" in text
    rebuilt = tdconv.load(out, torchvision.models.resnet18(num_classes=10))
    assert isinstance(rebuilt.layer1[0].conv2, tdconv.FactorizedConv2d)


def test_compress_budget_and_weights(require_ext, tmp_path, capsys):
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10)
    weights = tmp_path / "dense.pt"
    torch.save({"state_dict": dense.state_dict()}, weights)
    assert main(["compress", "--model", "resnet18", "--weights", str(weights), "--method", "tucker",
                 "--target-macs", "0.5", "--n-iter-max", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "37.18 M -> 18." in text  # at or under half, within 2 %


def test_compress_with_calibration(require_ext, capsys):
    assert main(["compress", "--model", "resnet18", "--method", "tucker", "--layers", "layer2.0.conv2,layer4.1.conv2",
                 "--calibration", "64",
                 "--dataset", "synthetic", "--n-iter-max", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "layer4.1.conv2" in text and "fit" in text
    with pytest.raises(SystemExit, match="--calibration: .*training set has"):
        main(["compress", "--model", "resnet18", "--calibration", "100000", "--dataset", "synthetic", "--quiet"])
    with pytest.raises(SystemExit, match=r"--calibration: --dataset synthetic has images \(3, 32, 32\); --input-size"):
        main(["compress", "--model", "resnet18", "--calibration", "8", "--dataset", "synthetic", "--input-size",
              "3,64,64", "--quiet"])


@pytest.mark.parametrize("argv,message", [
    (["compress", "--model", "resnet999"], "not a torchvision model"),
    (["compress", "--model", "resnet18", "--weights", "missing.pt"], "does not exist"),
    (["compress", "--model", "resnet18", "--layers", "nope.conv"], "does not have"),
    (["report", "missing.pt"], "does not exist"),
])
def test_bad_arguments(require_ext, argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        main(argv)


@pytest.mark.parametrize("argv", [["compress", "--model", "resnet18", "--rank", "half"],
                                  ["compress", "--model", "resnet18", "--target-macs", "2"]])
def test_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        main(argv)
    err = capsys.readouterr().err
    assert "--rank must be" in err or "budget must be a fraction" in err


@pytest.mark.parametrize("meta, match", [
    ({"model": "resnet18", "stem": "cifar"}, r"metadata lacks 'num_classes'"),
    ({"model": "resnet18", "num_classes": "ten"}, r"metadata has num_classes='ten': expected an int >= 1"),
    ({"model": "resnet18", "num_classes": 10, "stem": "tiny"}, r"metadata has stem='tiny'"),
    ({"model": "resnet18", "num_classes": 100}, r"resnet18 with 100 classes.*does not fit the file's weights"),
    ({"model": "resnet999", "num_classes": 10}, r"'resnet999' is not a torchvision model"),
    ({"model": "resnet18", "num_classes": 10, "report": {"method": "cp"}}, r"metadata 'report' is incomplete"),
])
def test_report_with_incomplete_metadata_says_what_is_missing(tmp_path, meta, match):
    path = tmp_path / "model.pt"
    tdconv.save(torchvision.models.resnet18(num_classes=10), path, meta=meta)
    with pytest.raises(SystemExit, match=match):
        main(["report", str(path)])


@pytest.mark.parametrize("command", ["compress", "experiment"])
@pytest.mark.parametrize("device, message", [
    ("cuda", "--device 'cuda': CUDA is not available on this machine"),
    ("cuda:0", "--device 'cuda:0': CUDA is not available on this machine"),
    ("tpu", "--device must be cpu, cuda or cuda:N, got 'tpu'"),
])
def test_unusable_device_is_a_usage_error(monkeypatch, capsys, tmp_path, command, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [command, "--device", device] + (["--model", "resnet18"] if command == "compress" else
                                            ["--dataset", "synthetic", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="^2$"):
        main(argv)
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)
