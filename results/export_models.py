"""Embed the two calibrated CPU-reproduction models in the package (issue 12).

    python results/export_models.py fs     # -> fsmooth/models/weights/wrn-16-1-cifar10-jpeg-fs36.*
    python results/export_models.py std    # -> fsmooth/models/weights/wrn-16-1-cifar10-jpeg-std36.*

Run from the repository root after `fsmooth calibrate` on the run folder (see results/PLAN.md).
"""
import argparse

from fsmooth.models import zoo

CALIBRATION_LOG = {"fs": "results/calibration/wrn-16-1-cifar10-jpeg-fs.log",
                   "std": "results/calibration/wrn-16-1-cifar10-jpeg-std-small-beta.log"}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("kind", choices=sorted(CALIBRATION_LOG))
parser.add_argument("--data", default="../shared/datasets/cifar10-jpeg-q75.tar.gz")
args = parser.parse_args()
caveat = ("WRN-16-1 trained 36 epochs on one CPU core for the CPU reproduction (issue 12); far from the paper's "
          "WRN-28-10" + ("; trained without L_F (plain CE)" if args.kind == "std" else ""))
notes = {"export_command": f"python results/export_models.py {args.kind} --data {args.data}",
         "calibration_log": CALIBRATION_LOG[args.kind], "caveat": caveat}
meta = zoo.export_pretrained(f"results/training/wrn-16-1-cifar10-jpeg-{args.kind}",
                             f"wrn-16-1-cifar10-jpeg-{args.kind}36", data=args.data, notes=notes)
print(meta["name"], meta["defense"], meta["subset_check"]["correct"], "/", meta["subset_check"]["n"])
