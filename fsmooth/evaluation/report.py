"""The evaluation report: a JSON document, a markdown table and per-image tensors for the figures."""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from .._machine import machine
from .._version import __version__
from ..io import write_safetensors_atomic, write_text_atomic
from .protocols import carried_from, clean_run_id
from .scoring import (accuracy_summary, eps_sweep_flag, gradient_masking_flag, perturbation_check,
                      rescore_summary)
from .store import json_value, write_json

__all__ = ["build_report", "write_outputs", "markdown", "environment"]

TABLE_COLUMNS = ("apgd-ce", "apgd-t", "fab-t", "square", "aa-standard", "aa-rand", "eot-pgd-ce",
                 "eot-pgd-dlr-targeted", "apgd-ce-maxloss", "transfer", "transfer-maxloss", "torchattacks-eotpgd")


def environment() -> dict:
    import pyautoattack  # optional and slow to import: only the report's environment block names its version

    here = machine()  # where the report was written; each run's chunks name their own (``machines`` in its row)
    env = {"fsmooth": __version__, "torch": torch.__version__, "pyautoattack": pyautoattack.__version__,
           "python": platform.python_version(), "cuda": torch.version.cuda,
           "device": machine_text(here, versions=False), "machine": here}
    try:
        import torchattacks  # optional cross-check library
        env["torchattacks"] = torchattacks.__version__
    except Exception:  # optional cross-check library
        env["torchattacks"] = None
    return env


def _iteration_stats(iterations: torch.Tensor) -> dict | None:
    it = iterations.float()
    it = it[it >= 0]
    if it.numel() == 0:
        return None
    return {"mean": float(it.mean()), "max": float(it.max())}


def _diverged_stats(diverged: torch.Tensor | None) -> dict | None:
    """How many images' scoring forward tripped the defense's divergence guard, of those that report it (a
    re-scoring's ``(runs, n)``: in any run)."""
    if diverged is None:
        return None
    d = diverged.float().reshape(-1, diverged.shape[-1])
    known = (d >= 0).all(0)
    if not bool(known.any()):
        return None
    return {"images": int(((d > 0).any(0) & known).sum()), "of": int(known.sum())}


def _run_row(ctx, result) -> dict:
    spec = result.spec
    n = int(result.correct.numel())
    row = {"run_id": spec.run_id, "protocol": spec.protocol, "column": spec.column, "kind": spec.kind,
           "target": spec.target, "outer_loops": spec.outer_loops, "eps": spec.eps, "eps_255": spec.eps * 255,
           **accuracy_summary(result.correct), "wall_s": result.wall_s,
           "wall_per_image_s": result.wall_s / n if n else math.nan,
           "defense_iterations": _iteration_stats(result.iterations),
           "defense_diverged": _diverged_stats(result.diverged), "settings": result.settings,
           "seeds": result.seeds, "machines": result.machines, "autoattack_flags": result.flags}
    if spec.kind != "clean" and result.x_adv is not None:
        row["perturbation"] = perturbation_check(ctx.images.cpu(), result.x_adv, spec.eps)
    return row


def build_report(ctx, specs, results, rescored, info) -> dict:
    runs = {spec.run_id: _run_row(ctx, results[spec.run_id]) for spec in specs}
    flags: list[dict] = []
    for row in runs.values():
        for f in row["autoattack_flags"]:
            flags.append({"where": row["run_id"], "source": "autoattack", **f})
        check = row.get("perturbation")
        if check is not None and not check["ok"]:
            flags.append({"where": row["run_id"], "kind": "perturbation outside the threat model",
                          "message": f"max L-inf {check['max_linf']:.6f} vs eps {row['eps']:.6f}, "
                                     f"range [{check['min']:.4f}, {check['max']:.4f}], NaN {check['nan']}"})
    undefended = runs.get(clean_run_id("undefended", 0))
    settings = []
    for setting, entry in rescored.items():
        target, k = setting.target, setting.outer_loops
        group = [runs[r] for r in entry["runs"]]
        clean = runs[clean_run_id(target, k)]
        columns = {row["column"]: row["accuracy"] for row in group}
        s = {"target": target, "outer_loops": k, "eps": group[0]["eps"], "eps_255": setting.eps_255,
             "clean": {key: clean[key] for key in ("n", "correct", "accuracy", "ci95")}, "columns": columns,
             "worst_case": accuracy_summary(entry["robust"]),
             "fooled_by": _count([f for f in entry["fooled_by"] if f is not None]), "flags": []}
        adaptive = {c: a for c, a in columns.items() if c.startswith("adaptive")}
        if adaptive:
            s["columns"]["adaptive-min"] = min(adaptive.values())
        if "rescore" in entry:
            r = entry["rescore"]
            s["rescore"] = rescore_summary(r.correct_runs)
            s["rescore"]["strict_robust"] = accuracy_summary(entry["robust"] & r.correct_runs.all(0))
            s["defense_iterations"] = {"clean": _iteration_stats(results[clean_run_id(target, k)].iterations),
                                       "adversarial": _iteration_stats(r.iterations)}
            s["defense_diverged"] = _diverged_stats(r.diverged)  # in any of the re-scoring runs
        threat = {row["run_id"]: results[row["run_id"]].spec.threat for row in group}
        white = {row["column"]: row["accuracy"] for row in group if threat[row["run_id"]] == "white-box"}
        black = {row["column"]: row["accuracy"] for row in group
                 if threat[row["run_id"]] in ("black-box", "transfer")}
        masking = gradient_masking_flag(black, white)
        if masking:
            s["flags"].append(masking)
            flags.append({"where": setting.id, **masking})
        settings.append(s)
    order = {"defended": 0, "standard-defended": 1, "undefended": 2}
    settings.sort(key=lambda s: (order.get(s["target"], 3), s["outer_loops"], s["eps"]))
    sweep = _eps_sweep(runs)
    if sweep and sweep.get("flag"):
        flags.append({"where": "eps-sweep", **sweep["flag"]})
    timing = {}
    for row in runs.values():
        if row["kind"] == "clean":
            timing[row["run_id"]] = {"wall_per_image_s": row["wall_per_image_s"]}
            if undefended and undefended["wall_per_image_s"] > 0:
                timing[row["run_id"]]["cost_vs_undefended"] = row["wall_per_image_s"] / undefended["wall_per_image_s"]
    return {"info": {**info, "environment": environment()}, "settings": settings, "eps_sweep": sweep,
            "timing": timing, "flags": flags, "runs": list(runs.values())}


def _count(items) -> dict:
    out: dict = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _eps_sweep(runs: dict) -> dict | None:
    rows = [r for r in runs.values() if r["column"] == "apgd-ce-sweep"]
    if not rows:
        return None
    acc = {r["eps"]: r["accuracy"] for r in rows}
    return {"outer_loops": rows[0]["outer_loops"], "points": [{"eps": e, "eps_255": e * 255, "accuracy": a}
                                                               for e, a in sorted(acc.items())],
            "flag": eps_sweep_flag(acc)}


def unfooled_of(run: dict) -> str:
    """What a report's attack run returned for an image it did not fool (its ``unfooled`` setting): runs
    recorded before the setting existed (2026-11-28) returned it clean."""
    return run.get("settings", {}).get("unfooled", "clean")


def attacked_of(run: dict) -> str:
    """Which images a report's APGD run attacked (its ``attack_all`` setting): ``"all"``, or ``"first pass
    right"``, the library's choice (runs recorded before the setting existed, 2026-11-29), which leaves an image
    its first defended pass got wrong clean."""
    return "all" if run.get("settings", {}).get("attack_all", False) else "first pass right"


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _pct_ci(summary: dict) -> str:
    """An accuracy summary as "a [lo, hi]" in %."""
    lo, hi = summary["ci95"]
    return f"{_pct(summary['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"


def _budget_text(budget: dict) -> str:
    parts = []
    for key, value in budget.items():
        if key == "eps_sweep":
            value = "(" + ", ".join(f"{v * 255:g}" for v in value) + ")/255"
        elif isinstance(value, list):  # a tuple that went through report.json
            value = tuple(value)
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def markdown(report: dict) -> str:
    info = report["info"]
    env = info["environment"]
    device = device_text(env)
    lines = [f"# Robustness evaluation ({info.get('dataset', 'dataset not recorded')})", "",
             f"n = {info['n']}, seed {info['seed']}, protocols {', '.join(info['protocols'])}, "
             f"{info['started']} - {info['finished']}, {device}, torch {env['torch']}, "
             f"pyautoattack {env['pyautoattack']}, torchattacks {env['torchattacks']}, "
             f"world size {info['world_size']}.",
             f"Defense: {info['defense']}. Budget: {_budget_text(info['budget'])}.", ""]
    if info.get("image_order"):
        lines += [f"Images: the first n = {info['n']} of {info['image_order']}.", ""]
    part = info.get("partial")
    if part:
        lines += [f"**Partial report:** the first {part['images']} of the {part['planned']} planned images (the "
                  f"first {part['chunks']} chunks, finished by every attack run reported), re-scored here; the "
                  "evaluation's own report comes when it ends.", ""]
        if part.get("left_out"):
            lines += ["Left out, not having finished a chunk yet (the worst case here is without them): "
                      + ", ".join(f"`{r}`" for r in part["left_out"]) + ".", ""]
        if part.get("not_selected"):
            lines += ["Not selected by this command, though the state holds their work (select them to report them): "
                      + ", ".join(f"`{r}`" for r in part["not_selected"]) + ".", ""]
    if info.get("command"):
        lines += [f"Command: `{info['command']}`", ""]
    # An attack's points scored at another K (eot-transfer: "eot-pgd-ce-from-ol1") stand after the attack.
    carried = sorted({c for s in report["settings"] for c in s["columns"] if carried_from(c)})
    columns = [x for c in TABLE_COLUMNS for x in (c, *(d for d in carried if carried_from(d) == c))]
    present = [c for c in columns + ["adaptive-min"] if any(c in s["columns"] for s in report["settings"])]
    head = ["model", "K", "eps", "clean"] + present + ["worst case [95% CI]", "re-scored mean ± std",
                                                       "correct in all runs [95% CI]", "strict [95% CI]",
                                                       "defense iters clean/adv"]
    if report["settings"]:
        lines += ["## Robust accuracy (%)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["settings"]:
        wc = s["worst_case"]
        row = [s["target"], str(s["outer_loops"]) if s["target"] != "undefended" else "-", f"{s['eps_255']:g}/255",
               _pct(s["clean"]["accuracy"])] + [_pct(s["columns"].get(c)) for c in present]
        row.append(_pct_ci(wc))
        r = s.get("rescore")
        if r:
            # strict: in the worst case and also correct in every re-scoring run (older reports lack it).
            row += [f"{_pct(r['mean'])} ± {_pct(r['std'])}", _pct_ci(r["correct_in_all_runs"]),
                    _pct_ci(r["strict_robust"]) if "strict_robust" in r else "-"]
            it = s.get("defense_iterations") or {}
            c, a = it.get("clean"), it.get("adversarial")
            row.append(f"{c['mean']:.0f}/{a['mean']:.0f}" if c and a else "-")
        else:
            row += ["-", "-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    adaptive = [r for r in report["runs"] if r["column"].startswith("adaptive")]
    if adaptive:
        lines += ["", "## Adaptive attack: CE + lambda * max(L_F, delta) (robust accuracy %)", "",
                  "| model | K | eps | lambda | accuracy [95% CI] | images attacked | an image not fooled comes back |",
                  "|---|---|---|---|---|---|---|"]
        for r in adaptive:
            lines.append(f"| {r['target']} | {r['outer_loops']} | {r['eps_255']:g}/255 | {r['settings'].get('lam')} | "
                         f"{_pct_ci(r)} | {attacked_of(r)} | {unfooled_of(r)} |")
    if report.get("eps_sweep"):
        sw = report["eps_sweep"]
        lines += ["", f"## Eps sweep (APGD-CE, K = {sw['outer_loops']})", "", "| eps | accuracy |", "|---|---|"]
        lines += [f"| {p['eps_255']:g}/255 | {_pct(p['accuracy'])} |" for p in sw["points"]]
    # diverged: images whose scoring forward tripped the defense's divergence guard (DefenseDivergedWarning).
    lines += ["", "## Runs", "", "| run | n | accuracy [95% CI] | s/image | defense iters mean/max | diverged | "
              "max L-inf*255 |", "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        it, p, dv = r["defense_iterations"], r.get("perturbation"), r.get("defense_diverged")
        iters = f"{it['mean']:.1f}/{it['max']:.0f}" if it else "-"
        diverged = f"{dv['images']} of {dv['of']}" if dv else "-"
        linf = f"{255 * p['max_linf']:.3f}" if p else "-"
        lines.append(f"| {r['run_id']} | {r['n']} | {_pct_ci(r)} | {r['wall_per_image_s']:.4g} | "
                     f"{iters} | {diverged} | {linf} |")
    cost = {k: v.get("cost_vs_undefended") for k, v in report["timing"].items()}
    lines += ["", "Inference cost relative to the undefended model (clean pass): " +
              ", ".join(f"{k}: {v:.1f}x" for k, v in cost.items() if v is not None), ""]
    lines += _machines_markdown(report["runs"])
    lines += ["## Flags", ""]
    grouped: dict[tuple, list] = {}
    for f in report["flags"]:
        grouped.setdefault((f.get("kind"), f.get("message", "")), []).append(f["where"])
    lines += [f"- **{kind}** ({', '.join(where)}): {message}" for (kind, message), where in grouped.items()]
    if not grouped:
        lines.append("- none")
    return "\n".join(lines) + "\n"


def device_text(environment: dict) -> str:
    """A report's machine in words, from its machine record where it has one (an older report's ``device`` text
    also named torch's version, which the report names on its own)."""
    m = environment.get("machine")
    return machine_text(m, versions=False) if m else environment["device"]


def run_device_text(run: dict, environment: dict) -> str:
    """Where a report's ``run`` was computed, from the machines its chunks record; the report's own machine
    (:func:`device_text`) for a report without that record. A report resumed or re-rendered elsewhere (a partial
    report of GPU chunks, written here) is written by one machine and timed by another."""
    machines = run.get("machines")
    if not machines:
        return device_text(environment)
    texts = ("not recorded" if m["machine"] is None else machine_text(m["machine"], versions=False) for m in machines)
    return "; ".join(dict.fromkeys(texts))


def machine_text(m: dict | None, versions: bool = True) -> str:
    if m is None:
        return "not recorded (chunks saved before 2026-11-27 05:40 UTC)"
    text = f"{m['gpu'] or m['cpu']} ({m['cpu_capability']}, {m['threads']} threads)"
    return text + (f", torch {m['torch']}" + (f", CUDA {m['cuda']}" if m["gpu"] else "") if versions else "")


def _machines_markdown(runs: list) -> list:
    """Which machine computed which chunks: outcomes of the randomized defense can differ between machines."""
    where: dict[str, list] = {}
    for r in runs:
        for g in r.get("machines", []):
            text = machine_text(g["machine"]) + "".join(f"; resumed from {machine_text(m)}"
                                                         for m in g.get("resumed_from", []))
            where.setdefault(text, []).append(f"{r['run_id']} ({len(g['chunks'])})")
    if not where:
        return []
    return (["## Machines", "", "| machine | runs (chunks) |", "|---|---|"]
            + [f"| {m} | {', '.join(rs)} |" for m, rs in where.items()] + [""])


_HOW_IT_RAN = ("started", "finished", "world_size")  # not results: a rerun that computes nothing keeps them


def _keep_earlier_times(report: dict, path: Path) -> None:
    """Give ``report`` the start and finish times (and world size) of the report at ``path`` when that one holds
    the same results and environment: a rerun of a finished evaluation (every chunk reused, on any number of
    ranks) leaves its report as it was."""
    try:
        old = json.loads(path.read_text())
        kept = {key: old["info"][key] for key in _HOW_IT_RAN}
    except (OSError, ValueError, KeyError, TypeError):
        return

    def without(r: dict) -> dict:
        return {**r, "info": {k: v for k, v in r["info"].items() if k not in _HOW_IT_RAN}}

    if without(old) == without(json_value(report)):
        report["info"].update(kept)


def write_outputs(report: dict, results: dict, rescored: dict, out: Path, ctx) -> None:
    """``report.json``, ``report.md`` and ``per_image.safetensors`` (labels, per-run predictions, iterations).
    A report equal to the one already in ``out`` but for its times keeps that one's times."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _keep_earlier_times(report, out / "report.json")
    write_json(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    tensors = {"labels": ctx.labels.cpu()}
    for run_id, r in results.items():
        tensors[f"pred/{run_id}"] = r.pred
        tensors[f"iterations/{run_id}"] = r.iterations.float()
        if r.diverged is not None:
            tensors[f"diverged/{run_id}"] = r.diverged.float()
    for setting, entry in rescored.items():
        key = setting.id
        tensors[f"robust/{key}"] = entry["robust"]
        if "rescore" in entry:
            tensors[f"rescore_correct/{key}"] = entry["rescore"].correct_runs
            tensors[f"rescore_iterations/{key}"] = entry["rescore"].iterations.float()
            if entry["rescore"].diverged is not None:
                tensors[f"rescore_diverged/{key}"] = entry["rescore"].diverged.float()
            tensors[f"candidates/{key}"] = entry["candidates"][:16].contiguous()
    for run_id, r in results.items():  # a few adversarial examples for the Figure 4/5 panels
        if r.spec.column in ("apgd-ce", "apgd-t") and r.x_adv is not None:
            tensors[f"examples/{run_id}"] = r.x_adv[:16].contiguous()
    tensors["examples/clean"] = ctx.images[:16].cpu().contiguous()
    write_safetensors_atomic(out / "per_image.safetensors", tensors)
