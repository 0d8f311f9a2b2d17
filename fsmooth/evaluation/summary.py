"""Several ``fsmooth eval`` reports of the same models as one table: the worst case over every attack run.

Rows of a reproduction are often run as separate evaluations (different protocols, different n, different
sessions). Each one scores its own worst case; :func:`summarize` joins them per model and setting (target,
K, eps): a test image counts as robust only if it survives every attack in every report, on the first
``n`` images that all of them evaluated (each evaluation takes the first ``n`` test images, so their
images agree). Re-scoring is joined the same way (``strict``: also correct in every fresh defense run).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.wrn import WideResNet
from .protocols import Setting
from .report import attacked_of, device_text, run_device_text, unfooled_of
from .scoring import accuracy_summary

__all__ = ["summarize", "summary_markdown"]


def _label(info: dict) -> str:
    source = str(info.get("checkpoint") or "model")
    if source.startswith("pretrained:"):
        return source.split(":", 1)[1]
    path = Path(source)
    # runs/<name>/checkpoints/epoch-0036 -> <name>
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def _load(folder: Path) -> tuple[dict, dict]:
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{folder} holds no report.json: run `fsmooth eval --out {folder}` first")
    report = json.loads(report_path.read_text())
    part = report.get("info", {}).get("partial")
    if part:
        warnings.warn(f"{folder} is a partial report ({part['images']} of {part['planned']} planned images): "
                      "its evaluation had not finished", RuntimeWarning, stacklevel=3)
    return report, load_file(str(folder / "per_image.safetensors"))


_NO_BASELINE = {None, "none", "None"}  # how a report without --baseline records it


def _defended_by(info: dict) -> dict:
    """What a report's defended numbers depend on besides the model: its defense, the layer it smooths, and
    the baseline model and defense of its ``standard-defended`` settings."""
    fingerprint = info["fingerprint"]
    # The layer as resolved; reports before "defended_layer" (2026-11-28) record None for the default, and all
    # of them are of fsmooth's WRN checkpoints, whose default it names.
    layer = info.get("defended_layer") or fingerprint.get("layer") or WideResNet.default_layer
    return {"defense": info.get("defense", fingerprint.get("defense")), "layer": layer,
            "baseline_model": fingerprint.get("baseline_model"),
            "baseline_defense": fingerprint.get("baseline_defense")}


def _pct_ci(summary: dict) -> dict:
    return {k: summary[k] for k in ("n", "correct", "accuracy", "ci95")}


def _strength(run: dict) -> tuple[bool, bool]:
    """How strong an attack run's settings are, for choosing between the same attack in two reports before their
    numbers of images: a run that attacked every image and returned an image it did not fool at its highest loss
    beats one recorded before those settings (which left images clean: a weaker attack, a higher accuracy)."""
    return attacked_of(run) == "all", unfooled_of(run) != "clean"


def summarize(folders, names: dict | None = None) -> dict:
    """Join the reports in ``folders`` (``fsmooth eval --out`` folders); ``names`` maps a report's
    checkpoint label to the name shown. Returns ``{"models", "clean", "settings", "adaptive"}``."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("folders must name at least one evaluation folder")
    names = names or {}
    models: dict[str, dict] = {}
    defenses: dict[str, tuple[Path, dict]] = {}  # model -> the first report's defense, which the others must match
    clean: list[dict] = []
    groups: dict[tuple, dict] = {}
    adaptive: list[dict] = []
    for i, folder in enumerate(folders):
        report, tensors = _load(folder)
        info = report["info"]
        labels = tensors["labels"]
        if i == 0:  # every other report must have taken the same images, in the same order
            first_labels, first_order = labels, info.get("image_order")
        n = min(len(labels), len(first_labels))
        if not torch.equal(labels[:n], first_labels[:n]) or info.get("image_order") != first_order:
            raise ValueError(f"{folder} was evaluated on other images than {folders[0]} (image order "
                             f"{info.get('image_order') or 'first n of the source'!r} vs "
                             f"{first_order or 'first n of the source'!r})")
        model = names.get(_label(info), _label(info))
        fingerprint = info["fingerprint"]["model"]
        known = models.setdefault(model, {"model_checksum": fingerprint, "checkpoint": info.get("checkpoint"),
                                          "defense": info["defense"], "reports": []})
        if known["model_checksum"] != fingerprint:
            raise ValueError(f"two different models are both named {model!r} ({folder}); name them apart")
        defended_by = _defended_by(info)
        first_folder, first = defenses.setdefault(model, (folder, defended_by))
        # A worst case joined over two defenses (another beta, delta_test or layer) would describe neither. A
        # baseline is compared only where both reports have one (a report without it adds no baseline setting).
        differ = ", ".join(f"{k}: {defended_by[k]!r} vs {first[k]!r}" for k in sorted(defended_by)
                           if defended_by[k] != first[k]
                           and not (k.startswith("baseline") and _NO_BASELINE & {defended_by[k], first[k]}))
        if differ:
            raise ValueError(f"{folder} defends {model!r} otherwise than {first_folder} ({differ}); join only "
                             "reports of one defense")
        if first["baseline_model"] in _NO_BASELINE:  # the first baseline seen is the one the later ones must match
            first.update({k: defended_by[k] for k in ("baseline_model", "baseline_defense")})
        known["reports"].append(str(folder))
        source = {"report": str(folder), "command": info.get("command"), "dataset": info.get("dataset"),
                  "device": device_text(info["environment"])}
        for s in report["settings"]:
            setting = Setting(s["target"], s["outer_loops"], s["eps"])
            robust = tensors[f"robust/{setting.id}"].bool()
            rescore = tensors.get(f"rescore_correct/{setting.id}")
            g = groups.setdefault((model, setting), {"robust": [], "strict": [], "columns": {}, "ranks": {},
                                                     "sources": []})
            g["robust"].append(robust)
            g["strict"].append(robust & rescore.bool().all(0) if rescore is not None else None)
            g["sources"].append(source)
        for run in report["runs"]:
            row = {**_pct_ci(run), "report": str(folder), "defense_iterations": run["defense_iterations"],
                   "wall_per_image_s": run["wall_per_image_s"]}
            if run["kind"] == "clean":
                clean.append({"model": model, "target": run["target"], "outer_loops": run["outer_loops"], **row,
                              **source, "device": run_device_text(run, info["environment"])})
                continue
            g = groups[(model, Setting(run["target"], run["outer_loops"], run["eps"]))]
            rank = (_strength(run), row["n"])
            if run["column"] not in g["columns"] or rank >= g["ranks"][run["column"]]:
                g["columns"][run["column"]], g["ranks"][run["column"]] = row, rank
            if run["column"].startswith("adaptive"):
                adaptive.append({"model": model, "outer_loops": run["outer_loops"], "eps_255": run["eps_255"],
                                 "lam": run["settings"].get("lam"), "attacked": attacked_of(run),
                                 "unfooled": unfooled_of(run), **_pct_ci(run),
                                 **source})
    settings = []
    for (model, setting), g in groups.items():
        n = min(r.numel() for r in g["robust"])
        robust = torch.stack([r[:n] for r in g["robust"]]).all(0)
        entry = {"model": model, "target": setting.target, "outer_loops": setting.outer_loops,
                 "eps_255": setting.eps_255,
                 "columns": g["columns"], "worst_case": accuracy_summary(robust), "reports": g["sources"]}
        if all(s is not None for s in g["strict"]):
            entry["strict"] = accuracy_summary(torch.stack([s[:n] for s in g["strict"]]).all(0))
        settings.append(entry)
    order = {"defended": 0, "standard-defended": 1, "undefended": 2}
    settings.sort(key=lambda s: (s["model"], order.get(s["target"], 3), s["outer_loops"], s["eps_255"]))
    clean.sort(key=lambda c: (c["model"], order.get(c["target"], 3), c["outer_loops"], -c["n"]))
    adaptive.sort(key=lambda a: (a["model"], a["outer_loops"], a["eps_255"], a["lam"]))
    return {"models": models, "clean": clean, "settings": settings, "adaptive": adaptive}


def _acc(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{100 * s['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={s['n']})"


def summary_markdown(summary: dict) -> str:
    """The joined tables: clean accuracy, robust accuracy per setting and attack, the adaptive attack."""
    lines = ["## Clean accuracy (%) [95% CI] (n)", "",
             "| model | classifier | K | accuracy | defense iterations mean/max | s/image | report |",
             "|---|---|---|---|---|---|---|"]
    for c in summary["clean"]:
        it = c["defense_iterations"]
        iters = f"{it['mean']:.0f}/{it['max']:.0f}" if it else "-"
        k = str(c["outer_loops"]) if c["target"] != "undefended" else "-"
        lines.append(f"| {c['model']} | {c['target']} | {k} | {_acc(c)} | {iters} | "
                     f"{c['wall_per_image_s']:.3g} | `{c['report']}` |")
    lines += ["", "## Robust accuracy (%) [95% CI] (n): each attack, and the worst case over all of them", "",
              "| model | classifier | K | eps | attack | accuracy | report |", "|---|---|---|---|---|---|---|"]
    for s in summary["settings"]:
        head = f"| {s['model']} | {s['target']} | {s['outer_loops']} | {s['eps_255']:g}/255"
        for column, c in s["columns"].items():
            lines.append(f"{head} | {column} | {_acc(c)} | `{c['report']}` |")
        lines.append(f"{head} | **worst case** | **{_acc(s['worst_case'])}** | all above |")
        if "strict" in s:
            lines.append(f"{head} | worst case, also correct in every re-scoring run | {_acc(s['strict'])} | "
                         f"all above |")
    if summary["adaptive"]:
        lines += ["", "## Adaptive APGD-CE on CE + lambda * max(L_F, delta) (%) [95% CI] (n)", "",
                  "| model | K | eps | lambda | accuracy | images attacked | an image not fooled comes back | report |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in summary["adaptive"]:
            lines.append(f"| {a['model']} | {a['outer_loops']} | {a['eps_255']:g}/255 | {a['lam']:g} | {_acc(a)} | "
                         f"{a['attacked']} | {a['unfooled']} | `{a['report']}` |")
    return "\n".join(lines) + "\n"
