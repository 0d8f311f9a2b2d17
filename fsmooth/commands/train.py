"""``fsmooth train``: train a WideResNet with the feature-smoothing loss (under torchrun: DDP)."""
from __future__ import annotations

import argparse
import shlex

from ..distributed import is_main_process
from ..training import train
from .argtypes import delta, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a WRN with the feature-smoothing loss",
                              description="Train a WideResNet on CIFAR with CE + max(L_F, delta). Runs under torchrun "
                                          "for multi-GPU (DDP) training.")
    p.add_argument("--out", required=True, help="run folder: log.jsonl and checkpoints/")
    p.add_argument("--data", default=None, help="data source (torchvision folder, ImageFolder, .tar.gz); "
                                                "default $FSMOOTH_DATA")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    p.add_argument("--arch", default="wrn-16-4", help="wrn-28-10, wrn-16-4, ... or wrn-DEPTH-WIDTH")
    p.add_argument("--epochs", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--delta", type=delta, default=0.02, help="training delta of max(L_F, delta); 'none': plain CE")
    p.add_argument("--layer", default=None, help="feature layer (default: the model's, block1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--limit-train", type=positive_int, default=None, help="train on a fixed subset")
    p.add_argument("--limit-test", type=positive_int, default=None, help="evaluate on a fixed subset")
    p.add_argument("--max-epochs-this-run", type=positive_int, default=None,
                   help="stop after this many epochs (continue later with --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint (with the same hyperparameters)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (log and checkpoints) and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def run(args) -> int:
    result = train(args.out, arch=args.arch, data=args.data, dataset=args.dataset, epochs=args.epochs,
                   batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                   weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, delta=args.delta,
                   layer=args.layer, seed=args.seed, device=args.device, amp=args.amp, compile=args.compile,
                   limit_train=args.limit_train, limit_test=args.limit_test, resume=args.resume,
                   overwrite=args.overwrite, max_epochs_this_run=args.max_epochs_this_run, quiet=args.quiet,
                   command="fsmooth " + shlex.join(args.argv))
    if result.history and not args.quiet and is_main_process():
        last = result.history[-1]
        print(f"epoch {last['epoch']}: test acc {last['test_acc']:.4f}, test L_F {last['test_feature_loss']:.5f}; "
              f"checkpoint {result.checkpoint}")
    return 0
