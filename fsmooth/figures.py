"""Every figure fsmooth draws (PNG, matplotlib Agg), and the one atomic way to save them.

* :func:`plot_logs` - accuracy and feature loss per epoch of one or more training runs (``fsmooth plot-log``).
* :func:`training_curves` - Figures 2/3: every numeric field of a training JSONL log (``fsmooth figures``).
* :func:`plot_calibration` - the defense calibration search (``fsmooth calibrate``).
* :func:`feature_panels` - Figures 4/5: clean, adversarial (APGD-CE, APGD-T), noisy and defended images,
  each with one feature channel of the defended layer; :func:`figure4` is the demo's one-sample version.
* :func:`iteration_histogram` - defense iterations for clean vs adversarial inputs.
* :func:`accuracy_vs_eps` - robust accuracy against eps.
* :func:`from_report` - all of an evaluation folder's figures.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .defense import ActiveDefense, DefenseConfig
from .functional import feature_loss
from .io import atomic_path, read_jsonl
from .models.prefix import prefix as network_prefix

__all__ = ["save_figure", "read_log", "plot_logs", "training_curves", "plot_calibration", "feature_panels",
           "figure4", "iteration_histogram", "accuracy_vs_eps", "from_report"]


def _pyplot():
    import matplotlib  # optional and slow to import: only when a figure is drawn
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, output, dpi: int = 120, **savefig_kwargs) -> Path:
    """Write ``fig`` atomically (:func:`fsmooth.io.atomic_path`) and close it; returns the path."""
    output = Path(output)
    try:
        with atomic_path(output) as tmp:
            fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
    finally:
        _pyplot().close(fig)
    return output


# --------------------------------------------------------------------------- training curves


def read_log(path: str | os.PathLike, *, corrupt: str = "raise") -> list[dict]:
    """The records of a ``log.jsonl`` (or of ``<run>/log.jsonl`` for a run folder); a torn last line is
    skipped, another unreadable line handled as :func:`fsmooth.io.read_jsonl`'s ``corrupt`` says."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"training log {str(path)!r} does not exist")
    records = read_jsonl(path, corrupt=corrupt)
    if not records:
        raise ValueError(f"training log {str(path)!r} is empty")
    return records


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plot_field(ax, records: list[dict], key: str, xkey: str | None, *args, **kwargs) -> None:
    """One training curve: field ``key`` against ``xkey`` (epoch, step) or the record number."""
    points = [(r[xkey] if xkey else i, r[key]) for i, r in enumerate(records) if _is_number(r.get(key))]
    ax.plot([p[0] for p in points], [p[1] for p in points], *args, **kwargs)


def plot_logs(paths, output: str | os.PathLike, *, delta: float | None = None) -> Path:
    """Two panels (accuracy; feature loss, log scale) for one or more runs; returns the PNG path."""
    plt = _pyplot()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    fig, (ax_acc, ax_lf) = plt.subplots(1, 2, figsize=(10, 4))
    for path in paths:
        records = read_log(path)
        name = Path(path).parent.name if Path(path).is_file() else Path(path).name
        for key, style in (("train", "--"), ("test", "-")):
            _plot_field(ax_acc, records, f"{key}_acc", "epoch", style, label=f"{name} {key}")
            _plot_field(ax_lf, records, f"{key}_feature_loss", "epoch", style, label=f"{name} {key}")
    if delta is not None:
        ax_lf.axhline(delta, color="gray", linestyle=":", label=f"delta = {delta:g}")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    ax_lf.set(xlabel="epoch", ylabel="L_F (mean |F - mean F|)", title="Feature loss", yscale="log")
    for ax in (ax_acc, ax_lf):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, output)


def training_curves(log_path, path) -> Path:
    """Figures 2/3: each numeric field of a training JSONL log against epoch (or step, or line number)."""
    plt = _pyplot()
    rows = read_log(log_path, corrupt="skip")
    xkey = next((k for k in ("epoch", "step") if all(k in r for r in rows)), None)
    keys = sorted({k for r in rows for k, v in r.items() if k != xkey and _is_number(v)})
    if not keys:
        raise ValueError(f"training log {str(log_path)!r} has no numeric fields")
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _plot_field(ax, rows, key, xkey)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xkey or "record")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    return save_figure(fig, path, bbox_inches="tight")


# --------------------------------------------------------------------------- calibration


def plot_calibration(report: dict, output: str | os.PathLike) -> Path:
    """Defended accuracy, iterations and L-inf distance against delta_test for each beta of a search.

    ``report`` is what :func:`fsmooth.calibrate.calibrate_defense` returns; the chosen
    point is starred, the target's bounds are dotted lines.
    """
    plt = _pyplot()
    points, target, chosen = report["points"], report["target"], report["chosen"]
    panels = (("defended clean accuracy", lambda p: p["accuracy"]),
              ("iterations (median; bars q10-q90)", lambda p: p["iterations"]["median"]),
              ("L-inf(defended - input) x 255 (median)", lambda p: p["linf"]["median"]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for beta in sorted({p["beta"] for p in points}, reverse=True):
        group = sorted((p for p in points if p["beta"] == beta), key=lambda p: p["delta"])
        deltas = [p["delta"] for p in group]
        for ax, (_, value) in zip(axes, panels):
            ax.plot(deltas, [value(p) for p in group], "o-", label=f"beta {beta:.3g}")
        lo = [p["iterations"]["median"] - p["iterations"]["q10"] for p in group]
        hi = [p["iterations"]["q90"] - p["iterations"]["median"] for p in group]
        axes[1].errorbar(deltas, [p["iterations"]["median"] for p in group], yerr=[lo, hi], fmt="none",
                         ecolor="gray", alpha=0.4)
    bare = points[0]["bare_accuracy"]
    axes[0].axhline(bare, color="k", linestyle="--", label=f"bare model {bare:.3f}")
    axes[0].axhline(bare - target["accuracy_tolerance"], color="gray", linestyle=":", label="tolerance")
    axes[1].axhline(target["min_median_iterations"], color="gray", linestyle=":", label="min median")
    axes[1].axhline(report["max_iters"], color="r", linestyle=":", label="cap")
    axes[1].set_yscale("log")
    axes[2].axhline(target["max_median_linf"] * 255, color="gray", linestyle=":", label="max median")
    for ax, (title, value) in zip(axes, panels):
        ax.plot([chosen["delta"]], [value(chosen)], "*", color="k", markersize=14, label="chosen")
        ax.set(xlabel="delta_test", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    verdict = "meets the target" if report["satisfied"] else "NO point met the target: closest shown"
    fig.suptitle(f"Active Defense calibration, n={report['n']} {report.get('split', '')} images, "
                 f"{report['start']['feature_size']} features: {verdict}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, output)


# --------------------------------------------------------------------------- feature panels (Figures 4/5)


def _image(t: torch.Tensor):
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _panel_figure(columns: dict[str, torch.Tensor], feature_net, channel: int, *, count: int, figsize,
                  loss_titles: bool = False):
    """Per example, a row of images and a row of feature channel ``channel``; one column per entry."""
    plt = _pyplot()
    fig, axes = plt.subplots(2 * count, len(columns), figsize=figsize, squeeze=False)
    with torch.no_grad():
        for j, (title, batch) in enumerate(columns.items()):
            feats = feature_net(batch.float())
            for i in range(count):
                axes[2 * i, j].imshow(_image(batch[i]))
                axes[2 * i + 1, j].imshow(feats[i, channel].float().cpu().numpy(), cmap="viridis")
                axes[2 * i, j].set_title(title if i == 0 else "", fontsize=9)
                if loss_titles:
                    axes[2 * i + 1, j].set_title(f"L_F {feature_loss(feats[i:i + 1].float()).item():.4f}",
                                                 fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig


def feature_panels(model, images: dict[str, torch.Tensor], path, *, layer: str | None = None, config=None,
                   channel: int = 0, count: int = 3, seed: int = 0) -> Path:
    """Figures 4/5: per example, a row of images and a row of feature channel ``channel`` at ``layer``.

    ``images`` maps a column title to a batch (e.g. ``{"clean": x, "APGD-CE": x1, "APGD-T": x2}``); the
    last two columns are the first adversarial batch plus the defense noise and after Active Defense.
    """
    defense = ActiveDefense(model, layer, config)
    names = list(images)
    attacked = images[names[1]] if len(names) > 1 else images[names[0]]
    count = min(count, attacked.shape[0])
    noise = defense.draw_noise(attacked[:count], generator=torch.Generator().manual_seed(seed))
    columns = {n: images[n][:count] for n in names}
    columns["noisy"] = attacked[:count] + noise.to(attacked.dtype)
    columns["defended"] = defense(attacked[:count], noise=noise)
    fig = _panel_figure(columns, network_prefix(model, layer), channel, count=count,
                        figsize=(2 * len(columns), 4 * count))
    return save_figure(fig, path, bbox_inches="tight")


def figure4(model, defended, x: torch.Tensor, x_adv: torch.Tensor, output, config, generator) -> Path:
    """Clean, adversarial, noisy and defended image of one sample, with one feature channel each (PNG)."""
    noise = (torch.rand(x_adv.shape, generator=generator, device=x_adv.device) * 2 - 1) * config.sigma
    info = defended.defense(x_adv, return_info=True, noise=noise)
    net = network_prefix(model)
    with torch.no_grad():
        channel = int(net(x)[0].flatten(1).var(1).argmax())  # the clean image's most varied channel
    columns = {"clean": x, "adversarial": x_adv, "noisy": x_adv + noise, "defended": info.inputs}
    fig = _panel_figure(columns, net, channel, count=1, figsize=(10, 5), loss_titles=True)
    fig.suptitle(f"Active Defense ({int(info.iterations[0])} iterations); feature channel {channel}")
    fig.tight_layout()
    return save_figure(fig, output, dpi=110)


# --------------------------------------------------------------------------- evaluation diagnostics


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
    return save_figure(fig, path, bbox_inches="tight")


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
    return save_figure(fig, path, bbox_inches="tight")


def from_report(report_dir, out_dir, *, model=None, layer=None, config=None) -> list[Path]:
    """All figures an evaluation folder supports; Figures 4/5 need ``model``."""
    # The evaluation package imports pyautoattack (optional, slow): only an evaluation's figures need its ids.
    from .evaluation.protocols import Setting, clean_run_id

    report_dir, out_dir = Path(report_dir), Path(out_dir)
    report = json.loads((report_dir / "report.json").read_text())
    tensors = load_file(str(report_dir / "per_image.safetensors"))
    made = [accuracy_vs_eps(report, out_dir / "accuracy_vs_eps.png")]
    for row in report.get("settings", []):
        setting = Setting(row["target"], row["outer_loops"], row["eps"])
        adversarial = tensors.get(f"rescore_iterations/{setting.id}")
        clean = tensors.get(f"iterations/{clean_run_id(setting.target, setting.outer_loops)}")
        if adversarial is not None and clean is not None:
            name = f"iterations_{setting.id.replace('/', '_')}.png"
            made.append(iteration_histogram(clean, adversarial, out_dir / name, title=setting.id))
    if model is not None:
        if config is None and report["info"].get("defense"):
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
