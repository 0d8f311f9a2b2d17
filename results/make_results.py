"""Builds the CPU reproduction's results (issue 12) from the committed evaluation reports.

    python results/make_results.py            # write the files below
    python results/make_results.py --check    # write nothing; fail if they are stale or a quote is unsourced

Joins every `fsmooth eval` report under results/eval/ (a run's own report.json, or, for a run that has not
finished, its `fsmooth eval --partial` report in <run>/partial/, which the tables name) with `fsmooth summarize` (the worst case per
model and setting is the AND of the per-image verdicts over every attack of every report), adds the
embedded models' training and calibration metadata and the paper's numbers that the issue quotes, and writes:

- results/summary.md: `fsmooth summarize`'s own table (every attack run, each worst case);
- results/results.json: everything the tables show, `fsmooth summarize`'s JSON under "summary", and the
  report (command, log) behind each number, in two parts: "ten_classes" (the reports of
  `fsmooth.data.evaluation_order`) and "airplanes_only" (the earlier reports, of the first n images of the
  class-sorted copy), never joined;
- the generated tables in results/README.md, between the `<!-- tables:begin -->` / `<!-- tables:end -->`
  markers (the prose around them is written by hand);
- each report's report.md again from its report.json, so every report reads in today's format.

`--check` writes nothing and fails when one of these files is not what the committed reports make, or when
an accuracy interval quoted in the hand-written text (README.md, results/README.md, results/PLAN.md) is in
no committed report.md or summary.md: every number quoted can be traced to a report, and from it to its log.

Numbers come only from the reports; a cell whose run has not finished says so.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fsmooth.evaluation.report import markdown  # noqa: E402
from fsmooth.evaluation.store import json_text  # noqa: E402
from fsmooth.evaluation.summary import summarize, summary_markdown  # noqa: E402
from fsmooth.io import write_text_atomic  # noqa: E402

RESULTS = ROOT / "results"
WEIGHTS = ROOT / "fsmooth" / "models" / "weights"
MODELS = {"fs": "wrn-16-1-cifar10-jpeg-fs36", "std": "wrn-16-1-cifar10-jpeg-std36"}
DATASET = "CIFAR-10 (JPEG q75 copy)"
# Only the paper numbers the issue quotes (WRN-28-10, CIFAR-10, feature-smoothed + Active Defense).
PAPER = {"model": "WRN-28-10", "table1": {("aa-standard", 1, 8.0): 62.31, ("aa-standard", 10, 8.0): 68.54},
         "table3": "adaptive APGD-CE on CE + lambda * max(L_F, delta) is no stronger than APGD-CE"}
TABLE1_COLUMNS = ("apgd-ce", "apgd-t", "fab-t", "square", "aa-standard")
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"


def _pct(s: dict | None) -> str:
    if s is None:
        return "not run yet"
    lo, hi = s["ci95"]
    return f"{100 * s['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={s['n']})"


def _reports(ten_classes: bool = False) -> list[Path]:
    """Relative to the repository root, so the tables name them as committed. The reports without an
    ``image_order`` took the first n images of the class-sorted copy (airplanes only); the others took
    ``fsmooth.data.evaluation_order``'s (every class). The two are never joined."""
    found = []
    for run in sorted(p for p in (RESULTS / "eval").iterdir() if p.is_dir()):
        # A run still going (or stopped) counts by its `fsmooth eval --partial` report: the chunks it finished,
        # re-scored; the report's path (".../partial") and n say so in every table. A run extended after it
        # finished (more eps, more images) counts by both: its finished report, and a partial one on at least
        # as many images that was written after it or holds a setting it lacks (`fsmooth summarize` joins them
        # per image on the first n both have, and an attack in both keeps the run on more images: a partial
        # report on fewer would shrink the finished rows' worst case). A finished report rewritten after the
        # partial one (re-scored again, say) leaves the partial's other settings standing.
        got = {r: json.loads(r.read_text()) for r in (run / "report.json", run / "partial" / "report.json")
               if r.is_file()}
        done = got.get(run / "report.json", {"info": {}, "settings": []})

        def keys(report):
            return {(s["target"], s["outer_loops"], s["eps_255"]) for s in report["settings"]}

        for path, report in got.items():
            info = report["info"]
            if path.parent.name == "partial" and done["info"] and (
                    info["n"] < done["info"]["n"]
                    or (info["finished"] < done["info"]["finished"] and keys(report) <= keys(done))):
                continue  # on fewer images, or read before the run finished and adding nothing: it says less
            if bool(info.get("image_order")) == ten_classes:
                found.append(path.parent.relative_to(ROOT))
    return found


def _model_rows() -> list[dict]:
    rows = []
    for key, name in MODELS.items():
        meta = json.loads((WEIGHTS / f"{name}.json").read_text())
        last = json.loads((WEIGHTS / f"{name}.log.jsonl").read_text().strip().splitlines()[-1])
        rows.append({"name": name, "feature_loss_in_training": key == "fs", "arch": meta["arch"],
                     "epochs": meta["epochs"], "delta": meta["delta"] if key == "fs" else None,
                     "test_accuracy": last["test_acc"], "test_n": last["test_n"],
                     "train_feature_loss": last["train_feature_loss"], "test_feature_loss": last["test_feature_loss"],
                     "beta": meta["calibration"]["beta"], "delta_test": meta["delta_test"],
                     "train_command": meta["command"], "calibration_log": meta["calibration_log"],
                     "training_log": f"fsmooth/models/weights/{name}.log.jsonl"})
    return rows


def _reports_info(reports: list[Path]) -> dict:
    info = {}
    for r in reports:
        meta = json.loads((ROOT / r / "report.json").read_text())["info"]
        run = r.parent if r.name == "partial" else r
        part = meta.get("partial") or {}
        info[str(r)] = {"log": f"{run}.log", "partial": run != r,
                        **{k: part.get(k, []) for k in ("left_out", "not_selected")},
                        **{k: v for k, v in meta.items() if k in ("command", "started", "finished", "n", "image_order")}}
    return info


def _section(reports: list[Path]) -> dict:
    """The Table 1 and Table 3 layouts, bare accuracy and defense cost, from one set of reports (one image
    order: `fsmooth summarize` never joins two)."""
    summary = summarize(reports) if reports else {"models": {}, "clean": [], "settings": [], "adaptive": []}
    clean = {}
    for c in summary["clean"]:  # summarize sorts each classifier's clean passes largest n first: keep that one
        clean.setdefault((c["model"], c["target"], c["outer_loops"]), c)
    settings = {(s["model"], s["target"], s["outer_loops"], s["eps_255"]): s for s in summary["settings"]}
    table1 = []
    for key, name in MODELS.items():
        for k in (1, 10):
            for eps in (8.0, 16.0):
                s = settings.get((name, "defended", k, eps))
                cols = (s or {}).get("columns", {})
                row = {"model": name, "outer_loops": k, "eps_255": eps,
                       "clean": clean.get((name, "defended", k)),
                       **{c: cols.get(c) for c in TABLE1_COLUMNS},
                       "worst_case": s["worst_case"] if s else None,
                       "strict": s.get("strict") if s else None,
                       "other_attacks": {c: v for c, v in cols.items() if c not in TABLE1_COLUMNS},
                       "attacks_in_worst_case": sorted(cols),
                       "paper_aa": PAPER["table1"].get(("aa-standard", k, eps)) if key == "fs" else None}
                if s or (row["clean"] and eps == 8.0):
                    table1.append(row)
    return {"bare": [c for key, c in clean.items() if key[1] == "undefended"], "table1": table1,
            "adaptive": summary["adaptive"],
            "cost": [c for c in summary["clean"] if c["target"] != "undefended"],
            "reports": _reports_info(reports), "summary": summary}


def build() -> dict:
    return {"generated_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "command": "python results/make_results.py", "dataset": DATASET,
            "paper": {"model": PAPER["model"], "table3": PAPER["table3"],
                      "table1": [{"column": c, "outer_loops": k, "eps_255": e, "accuracy_pct": v}
                                 for (c, k, e), v in PAPER["table1"].items()]},
            "models": _model_rows(),
            "ten_classes": _section(_reports(ten_classes=True)),
            "airplanes_only": _section(_reports())}


def _section_tables(sec: dict, level: str) -> list[str]:
    out = [f"{level} Clean accuracy without the defense", "", "| model | accuracy | report |", "|---|---|---|"]
    for b in sec["bare"]:
        out.append(f"| `{b['model']}` | {_pct(b)} | `{b['report']}` |")
    out += ["", f"{level} Table 1 layout: Active Defense under attack", "",
            "Each attack column is that attack alone, scored by the defense run it was attacked through. `worst "
            "case`: correct in the clean defended pass and under every attack run at that setting, in any report "
            "(joined on the first n images all of them ran); `strict`: also correct in each of 5 fresh defense runs "
            "on one adversarial point per image (the first attack's that fooled it and moved it, else the first "
            "attack's that moved it; since 2026-11-28: before, an image the clean pass alone got wrong was re-scored "
            "clean). `other attacks`: each further attack alone (lambda: the adaptive APGD-CE of Table 3; transfer: "
            "AutoAttack standard on the bare model, its points scored through the defense; transfer-maxloss: "
            "APGD-CE's highest-loss point of every image on the bare model, scored likewise; eot-pgd-...-from-ol1: "
            "EOT-PGD's points against K = 1, scored through the defense at this K, an attack that does not adapt to K). The paper's column is "
            "its WRN-28-10 under AutoAttack standard; it has no number for the standard model here.", "",
            "| model | K | eps | clean (defended) | APGD-CE | APGD-T | FAB-T | Square | AutoAttack | worst case | "
            "strict | other attacks | paper AutoAttack |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sec["table1"]:
        paper = f"{r['paper_aa']:.2f}" if r["paper_aa"] is not None else "-"
        attacks = "; ".join(f"{c}: {_pct(v)}" for c, v in r["other_attacks"].items()) or "-"
        out.append(f"| `{r['model']}` | {r['outer_loops']} | {r['eps_255']:g}/255 | {_pct(r['clean'])} | "
                   + " | ".join(_pct(r[c]) for c in TABLE1_COLUMNS)
                   + f" | {_pct(r['worst_case'])} | {_pct(r['strict'])} | {attacks} | {paper} |")
    out += ["", f"{level} Table 3 layout: adaptive APGD-CE on CE + lambda * max(L_F, delta)", "",
            f"Paper: {PAPER['table3']} (the issue quotes no number). lambda = 0 is APGD-CE through the same "
            "oracle, the control. `attacked`: `all`, or only the images the first defended pass got right (the "
            "library's choice, before 2026-11-29: an image that one draw got wrong came back clean, unattacked, "
            "and was scored on a fresh draw). `not fooled`: what the attack returned for an image it attacked "
            "and did not fool (the report's `unfooled`; `clean` before 2026-11-28).", "",
            "| model | K | eps | lambda | accuracy | attacked | not fooled | report |",
            "|---|---|---|---|---|---|---|---|"]
    for a in sec["adaptive"]:
        out.append(f"| `{a['model']}` | {a['outer_loops']} | {a['eps_255']:g}/255 | {a['lam']:g} | {_pct(a)} | "
                   f"{a['attacked']} | {a['unfooled']} | `{a['report']}` |")
    if not sec["adaptive"]:
        out.append("| - | - | - | - | not run yet | - | - | - |")
    out += ["", f"{level} Defense cost (clean passes; CPU rows: one core per process)", "",
            "`device`: the machine the clean pass's chunks record having run on (`not recorded`: saved before "
            "2026-11-27 05:40 UTC), not the one that wrote the report.", "",
            "| model | K | defense iterations mean / max | s per image | device | report |", "|---|---|---|---|---|---|"]
    for c in sec["cost"]:
        it = c["defense_iterations"]
        out.append(f"| `{c['model']}` | {c['outer_loops']} | {it['mean']:.0f} / {it['max']:.0f} | "
                   f"{c['wall_per_image_s']:.3g} | {c['device']} | `{c['report']}` |")
    partial = [p for p, r in sec["reports"].items() if r["partial"]]
    out += ["", f"{level} Reports behind the numbers", ""]
    if partial:
        def named(p):
            r = sec["reports"][p]
            why = ([f"left out, no chunk finished yet: {', '.join(r['left_out'])}"] if r["left_out"] else []) + (
                [f"other runs in its state, not selected: {', '.join(r['not_selected'])}"] if r["not_selected"] else [])
            return f"`{p}`" + (f" ({'; '.join(why)})" if why else "")
        out += ["Not finished yet, and read through `fsmooth eval --partial` (the chunks each had finished, re-scored): "
                + ", ".join(named(p) for p in partial) + ".", ""]
    out += ["| report | log | n | command |", "|---|---|---|---|"]
    for path, r in sec["reports"].items():
        out.append(f"| `{path}/report.md` | `{r['log']}` | {r['n']} | `{r['command']}` |")
    return out


def tables(res: dict) -> str:
    out = [f"_Generated by `{res['command']}` on {res['generated_utc']} from the reports listed in each part; "
           f"all numbers are on {res['dataset']}, in %, with 95% Wilson intervals and n._", ""]
    out += ["### Models", "",
            "| model | L_F in training | test accuracy (n) | train / test L_F, last epoch | defense beta, delta_test |",
            "|---|---|---|---|---|"]
    for m in res["models"]:
        lf = f"yes (delta {m['delta']})" if m["feature_loss_in_training"] else "no (the paper's Standard)"
        out.append(f"| `{m['name']}` | {lf} | {100 * m['test_accuracy']:.2f} ({m['test_n']}) | "
                   f"{m['train_feature_loss']:.4f} / {m['test_feature_loss']:.4f} | {m['beta']:g}, {m['delta_test']:g} |")
    out += ["", "### All ten classes (`fsmooth eval`'s evaluation order since 2026-11-26)", ""]
    out += _section_tables(res["ten_classes"], "####")
    out += ["", "### Airplanes only (superseded: the first n images of the class-sorted copy, all of class 0)", "",
            "The reports before 2026-11-26. Kept because they are what earlier notes quote; they measure one "
            "class, and are never joined with the ten-class ones.", ""]
    out += _section_tables(res["airplanes_only"], "####")
    return "\n".join(out) + "\n"


def _around_tables(text: str, name: str) -> tuple[str, str]:
    """The hand-written text before and after the generated tables' markers."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{name} lacks the {BEGIN} / {END} markers")
    head, rest = text.split(BEGIN, 1)
    return head, rest.split(END, 1)[1]


def outputs(res: dict) -> dict[Path, str]:
    """The files ``res`` makes, by path: summary.md, results.json and results/README.md (its text between
    the markers replaced), and every report's ``report.md`` rendered again from its ``report.json`` by today's
    renderer."""
    readme = RESULTS / "README.md"
    text = readme.read_text() if readme.exists() else f"# CPU reproduction\n\n{BEGIN}\n{END}\n"
    head, tail = _around_tables(text, str(readme))
    return {RESULTS / "summary.md": "# All ten classes\n\n" + summary_markdown(res["ten_classes"]["summary"])
            + "\n# Airplanes only (superseded)\n\n" + summary_markdown(res["airplanes_only"]["summary"]),
            RESULTS / "results.json": json_text(res),
            readme: f"{head}{BEGIN}\n{tables(res)}{END}{tail}",
            **{j.with_name("report.md"): markdown(json.loads(j.read_text()))
               for j in sorted((RESULTS / "eval").rglob("report.json"))}}


# "81.3% [78.8, 83.6]" or "81.25 [78.80, 83.60]": an accuracy with its 95% interval, in prose or a report (a
# quote may wrap across lines: any white space around the %, the bracket and the comma).
_NUMBER = r"(\d+(?:\.\d+)?)\s*%?\s*"
INTERVAL = re.compile(rf"(?<![\d.]){_NUMBER}\[\s*{_NUMBER},\s*{_NUMBER}\]")
# The hand-written texts whose quoted intervals must come from a committed report.
PROSE = ("README.md", "results/README.md", "results/PLAN.md")


def _decimals(number: str) -> int:
    return len(number.split(".")[1]) if "." in number else 0


def unsourced(prose: str, evidence: str) -> list[str]:
    """Each "a% [lo, hi]" in ``prose`` that no "a [lo, hi]" of ``evidence`` rounds to (all three numbers to
    the prose's decimals, allowing for the evidence's own rounding to two decimals: a quote with two decimals
    must be the evidence's exactly). It checks that a quote can be found in a report, not that it is quoted
    for the right setting: an interval like "0.0 [0.0, 3.7]" is in many."""
    found = [tuple(float(v) for v in t) for t in INTERVAL.findall(evidence)]
    missing = []
    for t in INTERVAL.findall(prose):
        tol = [0.5 * 10 ** -_decimals(v) + (0.005 if _decimals(v) < 2 else 0.0) + 1e-9 for v in t]
        vals = [float(v) for v in t]
        if not any(all(abs(e - v) <= d for e, v, d in zip(ev, vals, tol)) for ev in found):
            missing.append(f"{t[0]}% [{t[1]}, {t[2]}]")
    return missing


def check() -> list[str]:
    """What is out of date or unsourced: each generated file (``outputs``) that differs from what the committed
    reports make now (the generation time aside), and each interval quoted in the hand-written texts (``PROSE``,
    outside the generated tables) that no report (``report.md``) or ``summary.md`` states."""
    problems = []
    committed = RESULTS / "results.json"
    res = build()
    if committed.is_file():
        res["generated_utc"] = json.loads(committed.read_text()).get("generated_utc")
    made = outputs(res)
    for path, text in made.items():
        if not path.is_file() or path.read_text() != text:
            problems.append(f"{path.relative_to(ROOT)} is not what the committed reports make: "
                            "run python results/make_results.py")
    evidence = "\n".join(text for path, text in made.items() if path.name in ("report.md", "summary.md"))
    for name in PROSE:
        text = (ROOT / name).read_text()
        if BEGIN in text:  # the generated tables are checked above
            text = "".join(_around_tables(text, name))
        problems += [f"{name}: {q} is in no committed report" for q in unsourced(text, evidence)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated file is out of date or a quoted interval "
                             "comes from no committed report")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    for path, text in outputs(build()).items():
        write_text_atomic(path, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
