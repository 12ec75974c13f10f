"""The options of ``tdconv experiment``, apart from the experiment itself: the command line builds its
parser from them without loading the training stack, and a resumed run compares its arguments with
the saved ones through them."""
from __future__ import annotations

import argparse

import torch

from .models import STEMS, parse_device, parse_fraction, parse_rank

__all__ = ["add_arguments", "defaults", "RUN_ARGUMENTS", "DEFAULT_CALIBRATION"]

# Calibration images of the data-aware rows: the most the budget allows, and enough for every
# layer of ResNet18 at 32x32 to see more patches than its live input dimensions.
DEFAULT_CALIBRATION = 4096

# The arguments that define a run's results: resuming with any of them changed is refused.
RUN_ARGUMENTS = ("model", "stem", "dataset", "train_subset", "test_subset", "weights", "methods", "rank", "layers",
                 "target_macs", "target_params", "min_rank", "n_iter_max", "epochs", "finetune_epochs", "batch_size",
                 "lr", "finetune_lr", "weight_decay", "label_smoothing", "warmup_epochs", "schedule", "distill",
                 "bn_recalibrate", "epc", "seed", "calibration", "refine_steps", "control")


def defaults() -> dict:
    """Every option's default value, by destination name."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args([]))


def add_arguments(p) -> None:
    """The ``tdconv experiment`` options."""
    p.add_argument("--model", default="resnet18", help="a torchvision ResNet (resnet18, resnet34, resnet50, ...)")
    p.add_argument("--stem", choices=STEMS, default="imagenet",
                   help="imagenet: 7x7/2 conv + max-pool (the seed's model); cifar: 3x3/1 conv, no max-pool")
    p.add_argument("--weights", help="start from this dense state dict instead of training the dense model")
    p.add_argument("--methods", default="dense,cp,tucker", help="comma-separated: dense, cp, cp4, tucker")
    p.add_argument("--rank", type=parse_rank, default=0.5,
                   help="int, 'R_out,R_in', a fraction of the channels, evbmf or energy=F (as in tdconv compress)")
    p.add_argument("--layers", default="seed", help="seed (conv2 of every block), all, or comma-separated names")
    p.add_argument("--target-macs", type=parse_fraction, help="whole-model MAC budget, a fraction of the dense model's")
    p.add_argument("--target-params", type=parse_fraction, help="whole-model parameter budget, a fraction")
    p.add_argument("--min-rank", type=float, default=0.0, help="with a budget: no layer below this fraction")
    p.add_argument("--n-iter-max", type=int, default=100, help="decomposition sweeps per layer")
    p.add_argument("--dataset", default="cifar10", help="cifar10, fashion-mnist, npz:DIR or synthetic")
    p.add_argument("--data-root", default="data", help="where torchvision data sets live or are downloaded to")
    p.add_argument("--train-subset", type=int, help="use this many training images (a fixed random subset)")
    p.add_argument("--test-subset", type=int, help="use this many test images")
    p.add_argument("--epochs", type=int, default=15, help="epochs of dense training")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs of each compressed model")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of dense training")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="peak learning rate of fine-tuning")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up of dense training")
    p.add_argument("--schedule", choices=("cosine", "onecycle", "constant"), default="cosine")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight in [0, 1] of distillation from the dense model during fine-tuning (0: off)")
    p.add_argument("--epc", action="store_true",
                   help="CP: follow ALS by error preserving correction (same kernel error, smallest components)")
    p.add_argument("--no-bn-recalibrate", dest="bn_recalibrate", action="store_false",
                   help="do not re-estimate BatchNorm statistics after decomposition")
    p.add_argument("--calibration", type=int, default=None, metavar="N",
                   help="training images (a fixed subset, no labels) for the data-aware rows (METHOD+data) next to "
                        f"each kernel-fitted row; default {DEFAULT_CALIBRATION} (every training image when there are "
                        "fewer); 0: kernel fits only")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="data-aware rows: Adam steps of block reconstruction per residual block (0: off)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="no control row (the dense model fine-tuned with the same epochs and schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where there is one)")
    p.add_argument("--out", default="runs", help="folder of runs; this run goes to OUT/NAME")
    p.add_argument("--name", help="the run's folder name (default: made from the arguments)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/NAME from its checkpoints")
    p.add_argument("--latency-batch", type=int, default=128)
    p.add_argument("--latency-runs", type=int, default=20, help="timed rounds (0: no latency measurement)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
