"""Figures (PNG, matplotlib Agg): the paper's Figures 2-5 and the evaluation's diagnostics.

* :func:`feature_panels` - Figures 4/5: clean, adversarial (APGD-CE, APGD-T), noisy and defended images,
  each with one feature channel of the defended layer.
* :func:`iteration_histogram` - defense iterations for clean vs adversarial inputs.
* :func:`accuracy_vs_eps` - robust accuracy against eps.
* :func:`training_curves` - Figures 2/3 from a training JSONL log (every numeric field per epoch/step).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..io import read_jsonl

__all__ = ["feature_panels", "iteration_histogram", "accuracy_vs_eps", "training_curves", "from_report"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    from ..plotting import save_figure
    return save_figure(fig, path, bbox_inches="tight")


def _image(t: torch.Tensor):
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def feature_panels(model, images: dict[str, torch.Tensor], path, *, layer: str | None = None, config=None,
                   channel: int = 0, count: int = 3, seed: int = 0) -> Path:
    """Figures 4/5: per example, a row of images and a row of feature channel ``channel`` at ``layer``.

    ``images`` maps a column title to a batch (e.g. ``{"clean": x, "APGD-CE": x1, "APGD-T": x2}``); the
    last two columns are the first adversarial batch plus the defense noise and after Active Defense.
    """
    from ..defense import ActiveDefense
    from ..models.prefix import prefix as network_prefix

    plt = _pyplot()
    feature_net = network_prefix(model, layer)
    defense = ActiveDefense(model, layer, config)
    names = list(images)
    attacked = images[names[1]] if len(names) > 1 else images[names[0]]
    count = min(count, attacked.shape[0])
    gen = torch.Generator().manual_seed(seed)
    noise = defense.draw_noise(attacked[:count], generator=gen)
    columns = {n: images[n][:count] for n in names}
    columns["noisy"] = attacked[:count] + noise.to(attacked.dtype)
    columns["defended"] = defense(attacked[:count], noise=noise)
    fig, axes = plt.subplots(2 * count, len(columns), figsize=(2 * len(columns), 4 * count), squeeze=False)
    with torch.no_grad():
        for j, (title, batch) in enumerate(columns.items()):
            feats = feature_net(batch.float())
            for i in range(count):
                axes[2 * i, j].imshow(_image(batch[i]))
                axes[2 * i + 1, j].imshow(feats[i, channel].float().cpu().numpy(), cmap="viridis")
                axes[2 * i, j].set_title(title if i == 0 else "", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    return _save(fig, path)


def iteration_histogram(clean: torch.Tensor, adversarial: torch.Tensor, path, *, title: str = "") -> Path:
    """Histogram of defense iterations per image, clean vs adversarial inputs (``-1`` entries ignored)."""
    plt = _pyplot()
    clean, adversarial = clean.float().flatten(), adversarial.float().flatten()
    clean, adversarial = clean[clean >= 0].numpy(), adversarial[adversarial >= 0].numpy()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    hi = max([1.0] + [float(a.max()) for a in (clean, adversarial) if a.size])
    bins = torch.linspace(0, hi, 31).numpy()
    ax.hist(clean, bins=bins, alpha=0.6, label=f"clean (mean {clean.mean():.0f})" if clean.size else "clean")
    ax.hist(adversarial, bins=bins, alpha=0.6,
            label=f"adversarial (mean {adversarial.mean():.0f})" if adversarial.size else "adversarial")
    ax.set_xlabel("defense iterations")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    ax.legend()
    return _save(fig, path)


def accuracy_vs_eps(report: dict, path) -> Path:
    """Robust accuracy against eps: the eps sweep and the worst case of each evaluated setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sweep = report.get("eps_sweep")
    if sweep:
        pts = sweep["points"]
        ax.plot([p["eps_255"] for p in pts], [100 * p["accuracy"] for p in pts], "o-",
                label=f"APGD-CE sweep (K={sweep['outer_loops']})")
    series: dict[tuple, list] = {}
    for s in report.get("settings", []):
        series.setdefault((s["target"], s["outer_loops"]), []).append((s["eps_255"], 100 * s["worst_case"]["accuracy"]))
    for (target, k), pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", label=f"{target} K={k}: worst case")
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
    return _save(fig, path)


def training_curves(log_path, path) -> Path:
    """Figures 2/3: each numeric field of a training JSONL log against epoch (or step, or line number)."""
    plt = _pyplot()
    rows = read_jsonl(log_path, corrupt="skip")
    if not rows:
        raise ValueError(f"training log {str(log_path)!r} has no records")
    xkey = next((k for k in ("epoch", "step") if all(k in r for r in rows)), None)
    keys = sorted({k for r in rows for k, v in r.items()
                   if k != xkey and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        raise ValueError(f"training log {str(log_path)!r} has no numeric fields")
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r[xkey] if xkey else i, r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xkey or "record")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    return _save(fig, path)


def from_report(report_dir, out_dir, *, model=None, layer=None, config=None) -> list[Path]:
    """All figures an evaluation folder supports; Figures 4/5 need ``model``."""
    from safetensors.torch import load_file

    report_dir, out_dir = Path(report_dir), Path(out_dir)
    report = json.loads((report_dir / "report.json").read_text())
    tensors = load_file(str(report_dir / "per_image.safetensors"))
    made = [accuracy_vs_eps(report, out_dir / "accuracy_vs_eps.png")]
    for key in sorted(k for k in tensors if k.startswith("rescore_iterations/")):
        setting = key.split("/", 1)[1]
        target, k = setting.split("/")[:2]
        clean = tensors.get(f"iterations/clean/{target}/{k}")
        if clean is not None:
            name = f"iterations_{setting.replace('/', '_')}.png"
            made.append(iteration_histogram(clean, tensors[key], out_dir / name, title=setting))
    if model is not None:
        if config is None and report["info"].get("defense"):
            from ..defense.config import DefenseConfig
            fields = dict(report["info"]["defense"])
            fields["clamp"] = tuple(fields["clamp"]) if fields.get("clamp") else None
            config = DefenseConfig(**fields)
        device = next(iter(model.parameters())).device
        tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("examples/")}
        examples = {"clean": tensors["examples/clean"]}
        for name in ("apgd-ce", "apgd-t"):
            key = next((k for k in sorted(tensors) if k.startswith("examples/defended/") and k.endswith("/" + name)),
                       None)
            if key is not None:
                examples[name.upper()] = tensors[key]
        made.append(feature_panels(model, examples, out_dir / "feature_panels.png", layer=layer, config=config))
    return made
