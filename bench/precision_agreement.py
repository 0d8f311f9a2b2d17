"""How often a bf16 prefix changes Active Defense's iteration counts and predictions, compared with fp32.

Both runs start from the same noisy points, so any difference comes from the
prefix precision alone (``t``, ``L_F`` and the exit test stay fp32 in both).
Defended images are classified by the full fp32 model. Writes a JSON-lines
and CSV row under ``--out-dir`` and a markdown table beside them.

    python bench/precision_agreement.py --data ../shared/datasets/cifar10-jpeg-q75.tar.gz --n 500
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

import fsmooth
from fsmooth.data import load_dataset
from fsmooth.models.zoo import DEFAULT_PRETRAINED, load_classifier

from benchlib import append_results, configure_logging, default_out_dir, environment

_log = logging.getLogger("bench.precision_agreement")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_PRETRAINED, help="embedded model name or checkpoint path")
    p.add_argument("--data", default=None, help="CIFAR-10 source (default $FSMOOTH_DATA)")
    p.add_argument("--n", type=int, default=500, help="test images (a fixed random subset)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=None, help="default bench/results/")
    p.add_argument("--quick", action="store_true",
                   help="8 synthetic images on a tiny random WRN, at most 10 iterations (smoke test)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def load_inputs(args) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    if args.quick:
        torch.manual_seed(args.seed)
        model = fsmooth.models.WideResNet(10, 1)
        images = torch.rand(8, 3, 32, 32)
        labels = torch.randint(0, 10, (8,))
        return model, images, labels, "synthetic (quick)"
    model, _ = load_classifier(args.model)
    images, labels = load_dataset(args.data, "test")
    subset = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.n]
    return model, images[subset].float() / 255, labels[subset], "CIFAR-10 (JPEG q75 copy)"


def defend_and_classify(model, engine, x, noise):
    info = engine(x, return_info=True, noise=noise)
    with torch.no_grad():
        pred = model(info.inputs).argmax(1)
    return info, pred


def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_logging(args.verbose)
    device = torch.device(args.device)
    model, images, labels, data_label = load_inputs(args)
    model = model.to(device).eval()
    max_iters = min(args.max_iters, 10) if args.quick else args.max_iters
    config = fsmooth.DefenseConfig.for_model(model, max_iters=max_iters)
    engines = {name: fsmooth.ActiveDefense(model, config=config, dtype=dtype)
               for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
    generator = torch.Generator().manual_seed(args.seed + 1)
    results = {name: {"iters": [], "pred": [], "converged": []} for name in engines}
    seconds = {name: 0.0 for name in engines}
    for start in range(0, images.shape[0], args.batch_size):
        x = images[start:start + args.batch_size].to(device)
        noise = engines["fp32"].draw_noise(x, generator, config.sigma)
        for name, engine in engines.items():
            begin = time.perf_counter()
            info, pred = defend_and_classify(model, engine, x, noise)
            seconds[name] += time.perf_counter() - begin
            results[name]["iters"].append(info.iterations.cpu())
            results[name]["pred"].append(pred.cpu())
            results[name]["converged"].append(info.converged.cpu())
        _log.info("%d/%d images", min(start + args.batch_size, images.shape[0]), images.shape[0])
    cat = {name: {k: torch.cat(v) for k, v in r.items()} for name, r in results.items()}
    a, b = cat["fp32"], cat["bf16"]
    n = labels.numel()
    row = {
        "benchmark": "precision_agreement", "model": args.model if not args.quick else "random wrn-10-1",
        "data": data_label, "n": n, "beta": config.beta, "delta_test": config.delta, "max_iters": config.max_iters, "seed": args.seed,
        "same_iterations": float((a["iters"] == b["iters"]).float().mean()),
        "mean_abs_iteration_difference": float((a["iters"] - b["iters"]).abs().float().mean()),
        "same_prediction": float((a["pred"] == b["pred"]).float().mean()),
        "accuracy_fp32": float((a["pred"] == labels).float().mean()),
        "accuracy_bf16": float((b["pred"] == labels).float().mean()),
        "mean_iterations_fp32": float(a["iters"].float().mean()),
        "mean_iterations_bf16": float(b["iters"].float().mean()),
        "converged_fp32": float(a["converged"].float().mean()),
        "converged_bf16": float(b["converged"].float().mean()),
        "seconds_fp32": seconds["fp32"], "seconds_bf16": seconds["bf16"],
    }
    env = environment(device)
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args.quick)
    append_results(out_dir, "precision_agreement", env, [row])
    table = format_markdown(row, env)
    (out_dir / "precision_agreement.md").write_text(table, encoding="utf-8")
    print(table)
    return row


def format_markdown(row: dict, env: dict) -> str:
    lines = [
        "# Active Defense: bf16 prefix vs fp32 (same noise)",
        "",
        f"{row['n']} images of {row['data']}, model `{row['model']}`, beta {row['beta']:.4g}, "
        f"delta_test {row['delta_test']:.5g}, "
        f"max_iters {row['max_iters']}, seed {row['seed']}.",
        f"Device: {env['device']} ({env['gpu_name'] if env['device'] == 'cuda' else env['cpu']}); "
        f"torch {env['torch']}, triton {env['triton']}; {env['date']}.",
        f"Command: `{env['command']}`",
        "",
        "| | fp32 | bf16 |",
        "| --- | --- | --- |",
        f"| accuracy of defended images | {row['accuracy_fp32']:.2%} | {row['accuracy_bf16']:.2%} |",
        f"| mean iterations | {row['mean_iterations_fp32']:.2f} | {row['mean_iterations_bf16']:.2f} |",
        f"| converged (L_F <= delta_test) | {row['converged_fp32']:.2%} | {row['converged_bf16']:.2%} |",
        f"| wall time (s) | {row['seconds_fp32']:.1f} | {row['seconds_bf16']:.1f} |",
        "",
        f"Same iteration count: {row['same_iterations']:.2%} of images "
        f"(mean |difference| {row['mean_abs_iteration_difference']:.2f}); "
        f"same prediction: {row['same_prediction']:.2%}.",
        "",
        "Wall times are the eager engine on this device; they are not a speed measurement of the GPU engines "
        "(see iters_per_sec.py).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
