"""``fsmooth.evaluate``: run protocols, score the worst case per image, re-score, report."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import warnings
import zlib
from pathlib import Path

import torch

from .._validation import as_unit_images, check_positive_int
from ..defense import DefendedClassifier, DefenseConfig
from ..distributed import barrier, rank_and_world
from ..models.prefix import resolve_layer
from .protocols import Budget, RunSpec, Setting, clean_run_id, parse_protocols, plan
from .report import build_report, write_outputs
from .runner import Context, RunResult, execute, other_settings, rescore, work_ahead
from .scoring import choose_candidates, worst_case
from .store import ChunkedData, ChunkStore, OverlayStore, tensor_checksum as _checksum

__all__ = ["evaluate", "default_defended_factory"]

_log = logging.getLogger(__name__)


def _layer_name(model, layer: str | None) -> str | None:
    """The layer the defense smooths, ``None`` resolved to the model's default where it has one (a custom
    ``defended_factory`` may defend a model without one)."""
    try:
        return resolve_layer(model, layer)
    except (TypeError, ValueError):
        return layer


def default_defended_factory(model, config, outer_loops: int, layer):
    """``DefendedClassifier(model, config, outer_loops, layer=layer)``."""
    return DefendedClassifier(model, config, outer_loops, layer=layer)


def _defense_config(value, model, fallback: str | None = None):
    """``value`` as a :class:`DefenseConfig`: a string is a preset; ``None`` is the model's calibrated
    setting, else the preset ``fallback`` (when given), else the paper's."""
    calibrated = isinstance(getattr(model, "defense_defaults", None), dict)
    if value is None and fallback is not None and not calibrated:
        value = fallback
    if value is None:
        return DefenseConfig.for_model(model)
    if isinstance(value, str):
        return DefenseConfig.preset(value)
    if not isinstance(value, DefenseConfig):
        raise TypeError(f"defense must be None, a preset name or a DefenseConfig, got {type(value).__name__}")
    return value


def _as_images(images, labels, n, device) -> tuple[torch.Tensor, torch.Tensor]:
    for value, name in ((images, "images"), (labels, "labels")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if labels.shape != images.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 of shape ({images.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if 1 < n < labels.shape[0] and int(labels[:n].unique().numel()) == 1 < int(labels.unique().numel()):
            warnings.warn(f"the first n={n} images are all of class {int(labels[0])}: the set looks sorted by "
                          "class; pass it shuffled (fsmooth.data.evaluation_order) to evaluate every class",
                          RuntimeWarning, stacklevel=3)
        images, labels = images[:n], labels[:n]
    return as_unit_images(images).to(device), labels.long().to(device)


def _model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _chunked_data(images: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> ChunkedData:
    """Each chunk's checksum (what its stored results are stamped with), and the whole-prefix checksum that state
    written before per-chunk stamps recorded."""
    n = int(labels.shape[0])
    return ChunkedData(checksums=tuple(_checksum(images[lo:lo + chunk_size], labels[lo:lo + chunk_size])
                                       for lo in range(0, n, chunk_size)),
                       chunk_size=chunk_size, images=n, prefix_checksum=lambda k: _checksum(images[:k], labels[:k]))


def _model_checksum(model) -> str:
    return _checksum(*[t.float() for t in model.state_dict().values()]) if model is not None else "none"


def _check_eps(eps) -> tuple[float, ...]:
    eps = (eps,) if isinstance(eps, (int, float)) else tuple(eps)
    for e in eps:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e <= 1:
            raise ValueError(f"eps values must be numbers in (0, 1] (e.g. 8/255), got {e!r}")
    if not eps:
        raise ValueError("eps must not be empty")
    return tuple(float(e) for e in eps)


def _check_outer_loops(outer_loops) -> tuple[int, ...]:
    outer_loops = (outer_loops,) if isinstance(outer_loops, int) else tuple(outer_loops)
    if not outer_loops or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in outer_loops):
        raise ValueError(f"outer_loops must be positive ints, got {outer_loops!r}")
    return outer_loops


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, protocol="paper",
             n: int | None = None, eps=(8 / 255, 16 / 255), outer_loops=(1, 10), defense=None,
             baseline_model: torch.nn.Module | None = None, baseline_defense=None,
             layer: str | None = None, budget: Budget | None = None, seed: int = 0, chunk_size: int = 250,
             batch_size: int = 250,
             out: str | Path | None = None, resume: bool = True, quiet: bool = False,
             defended_factory=None, meta: dict | None = None, partial: bool = False) -> dict:
    """Evaluate ``model`` with Active Defense under the attacks of ``protocol``; returns the report dict.

    Args:
        model: classifier on [0, 1] inputs (its device is used).
        images, labels: uint8 ``(N, 3, H, W)`` (or float in [0, 1]) and int64 labels; the first ``n`` are used.
        protocol: names from :data:`~fsmooth.evaluation.protocols.PROTOCOLS`, comma-separated or a list,
            or the groups ``"beyond"`` / ``"all"``.
        eps: L-inf radii in [0, 1] units (``8/255``).
        outer_loops: K values of the defended classifier (softmax averaged over K defense runs).
        defense: ``DefenseConfig``, preset name, or ``None`` (``DefenseConfig.for_model(model)``: the
            model's calibrated beta/delta, else the paper's).
        baseline_model, baseline_defense: the model trained without ``L_F`` and its defense setting for
            the "Standard (using Active Defense)" rows. ``None``: the baseline's own calibration
            (``fsmooth calibrate``), else the paper's ``"cifar10-standard"`` (delta 0.0562).
        budget: :class:`Budget` (paper defaults).
        seed: every chunk of every run is seeded from (seed, run, chunk).
        chunk_size: images per saved chunk (the resume granularity).
        batch_size: images per forward pass / attack call for K = 1; divided by K for outer_loops K
            (the defended batch holds K copies). Lower it if the GPU runs out of memory.
        out: folder for ``report.json``, ``report.md``, per-image tensors and resumable state.
        resume: reuse finished chunks under ``out/state``, also after ``n`` changed: every chunk whose images
            are unchanged (each chunk's stamp covers its own images).
        defended_factory: ``(model, config, outer_loops, layer) -> nn.Module``; default
            :class:`fsmooth.defense.DefendedClassifier`.
        meta: extra fields recorded in the report (command line, dataset label, ...).
        partial: report on the images an evaluation still running (or stopped) under ``out`` has finished, attacking
            nothing: the first chunks that every attack run has finished, in order (chunks 0 to j; a chunk attacked
            with other settings than the run's, which the evaluation will recompute, has not finished: a warning
            names it); an attack run that has finished no chunk is left out (``info["partial"]["left_out"]``, named
            in the report), and so is a run whose state is under ``out`` but which these arguments do not select
            (``info["partial"]["not_selected"]``, its run id, or its state folder for state saved before
            2026-11-29: select fewer eps to report a run that is ahead of the others at its own n). Their
            re-scoring (``budget.rescore_runs`` defended forwards per image) and any missing clean pass are
            computed and kept in ``out/partial/state``, apart from the evaluation's state; the report
            (``info["partial"]``: images reported and planned) goes to ``out/partial/``, never over a finished
            report. One process only; needs ``out`` holding state and ``resume``. Raises ``ValueError``
            when no attack run has finished a chunk, ``RuntimeError`` when a finished attack chunk cannot be used:
            unreadable, or its tensors missing (it is never recomputed).

    Under ``torchrun`` each rank runs a share of the chunks, taking the next chunk whenever it is free: the
    chunks of all the runs that need no other run's result (clean passes, attacks, AutoAttack) form one list,
    so a rank done with one run's chunks goes on to the next run's instead of waiting for a slow chunk
    (:func:`~fsmooth.evaluation.runner.work_ahead`); all ranks return the merged report and rank 0 writes it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    protocols = parse_protocols(protocol)
    eps = _check_eps(eps)
    outer_loops = _check_outer_loops(outer_loops)
    budget = budget or Budget()
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
    check_positive_int(chunk_size, "chunk_size")
    check_positive_int(batch_size, "batch_size")
    device = _model_device(model)
    images, labels = _as_images(images, labels, n, device)
    if images.shape[0] == 0:
        raise ValueError("images is empty (or n=0): there is nothing to evaluate")
    model.eval()
    if baseline_model is not None:
        baseline_model.eval()
    config = _defense_config(defense, model)
    baseline_config = (_defense_config(baseline_defense, baseline_model, fallback="cifar10-standard")
                       if baseline_model is not None else None)
    with torch.no_grad():
        num_classes = int(model(images[:1]).shape[1])
    rank, world = rank_and_world()
    data = _chunked_data(images, labels, chunk_size)
    fingerprint = {"data": _checksum(images, labels), "model": _model_checksum(model),
                   "baseline_model": _model_checksum(baseline_model), "seed": seed, "chunk_size": chunk_size,
                   "batch_size": batch_size,
                   "budget": budget.as_dict(), "defense": repr(config), "baseline_defense": repr(baseline_config),
                   "layer": layer}
    out = Path(out) if out is not None else None
    if partial:
        _check_partial(out, resume, world)
    stamped = {**fingerprint, "data": list(data.checksums)}  # the state's: each chunk's stamp covers its own images
    store = ChunkStore(out / "state" if out is not None else None, stamped, resume, owner=rank == 0, data=data)
    barrier()  # no rank reads or writes chunks before rank 0 has checked (or, resume=False, cleared) the state
    specs = plan(protocols, eps, outer_loops, budget, has_baseline=baseline_model is not None)
    planned_n = int(labels.shape[0])
    left_out: list[str] = []
    ctx = Context(model=model, images=images, labels=labels, defense_config=config,
                  defended_factory=defended_factory or default_defended_factory, budget=budget,
                  baseline_model=baseline_model, baseline_config=baseline_config, layer=layer, seed=seed,
                  chunk_size=chunk_size, batch_size=batch_size, store=store, rank=rank, world=world, quiet=quiet,
                  num_classes=num_classes, attacks_frozen=partial)
    if partial:
        not_selected = store.other_runs(spec.run_id for spec in specs)
        done, left_out = _finished_prefix(ctx, specs)
        specs = [spec for spec in specs if spec.run_id not in left_out]
        ctx = dataclasses.replace(ctx, images=images[:done], labels=labels[:done],
                                  store=OverlayStore(store, ChunkStore(out / "partial" / "state", stamped, resume,
                                                                       data=data)))
    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict[str, RunResult] = {}
    ahead = work_ahead(ctx, specs)  # torchrun: a rank free of one run's chunks takes the next run's
    for spec in specs:
        chunks = ahead.pop(spec.run_id, None)
        _log.info("%s %s", "running" if chunks is None else "gathering the chunks worked ahead of", spec.run_id)
        results[spec.run_id] = execute(ctx, spec, results, ahead=chunks)
    rescored = _rescore(ctx, specs, results)
    info = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "protocols": protocols, "n": ctx.n, "eps": list(eps), "outer_loops": list(outer_loops),
        "seed": seed, "chunk_size": chunk_size, "batch_size": batch_size, "world_size": world,
        "budget": budget.as_dict(),
        "defense": _config_dict(config), "baseline_defense": _config_dict(baseline_config),
        "layer": layer, "defended_layer": _layer_name(model, layer), "num_classes": num_classes,
        "fingerprint": fingerprint, **(meta or {}),
    }
    if partial:
        info["partial"] = {"images": ctx.n, "planned": planned_n, "chunks": ctx.n_chunks, "left_out": left_out,
                           "not_selected": not_selected}
    report = build_report(ctx, specs, results, rescored, info)
    if out is not None and rank == 0:
        write_outputs(report, results, rescored, out / "partial" if partial else out, ctx)
    return report


def _check_partial(out: Path | None, resume: bool, world: int) -> None:
    if out is None or not resume:
        raise ValueError("partial=True reports on the finished chunks under out: it needs out and resume=True")
    if world > 1:
        raise ValueError("partial=True runs as one process (its ranks could read different chunks of a running "
                         "evaluation): run it without torchrun")
    if not (out / "state" / "fingerprint.json").is_file():
        raise ValueError(f"partial=True: {str(out / 'state')!r} holds no evaluation state to report on")


def _finished_prefix(ctx: Context, specs) -> tuple[int, list[str]]:
    """``(images, left_out)``: how many of the first images every attack run of ``specs`` that has finished its
    first chunk has finished (chunks 0..j in order), and the attack runs left out for having finished none.
    A chunk attacked with other settings than the run's (:func:`~fsmooth.evaluation.runner.other_settings`) has
    not finished: a partial report attacks nothing, so it ends before such a chunk."""
    attacks = [spec for spec in specs if spec.kind != "clean"] or specs  # a clean-only protocol: its passes
    stale: list[str] = []

    def finished(spec, chunk: int) -> bool:
        meta = ctx.store.finished(spec.run_id, chunk)
        if meta is None:
            return False
        other = other_settings(ctx, spec, chunk, meta)
        if other is not None:
            stale.append(f"chunk {chunk} of {spec.run_id!r}: {other}")
        return other is None

    left_out = [spec.run_id for spec in attacks if not finished(spec, 0)]
    if len(left_out) == len(attacks):
        raise ValueError(f"partial: no attack run has finished a chunk yet ({left_out[0]!r} has not finished "
                         "its first chunk with its present settings): nothing to report")
    done = ctx.n_chunks
    for spec in attacks:
        if spec.run_id in left_out:
            continue
        count = 0
        while count < done and finished(spec, count):
            count += 1
        done = count
    for why in stale:
        warnings.warn(f"partial report: counted as not finished, {why}", RuntimeWarning, stacklevel=3)
    return min(done * ctx.chunk_size, ctx.n), left_out


def _config_dict(config) -> dict | None:
    if config is None:
        return None
    return {k: getattr(config, k) for k in ("sigma", "beta", "delta", "max_iters", "clamp")}


def fallback_order(group: list[RunSpec]) -> list[str]:
    """The attack runs whose points re-score an image no run fooled, in order: plan order, but the adaptive
    runs with lambda != 0 last (their highest-loss points trade cross-entropy for L_F; lambda = 0 is APGD-CE)."""
    attacks = [s for s in group if s.kind == "attack"]
    mixed = lambda s: s.options.get("name") == "AdaptiveAPGD" and s.options["kwargs"].get("lam", 0.0) != 0.0  # noqa: E731
    return [s.run_id for s in sorted(attacks, key=mixed)]


def settings_of(specs: list[RunSpec]) -> dict[Setting, list[RunSpec]]:
    """Attack runs grouped by their :class:`Setting`, plan order kept."""
    groups: dict[Setting, list[RunSpec]] = {}
    for spec in specs:
        if spec.kind != "clean":
            groups.setdefault(spec.setting, []).append(spec)
    return groups


def _rescore(ctx: Context, specs, results) -> dict:
    """Per setting: worst case over clean + all attacks, and (defended targets) re-scored candidates."""
    out = {}
    for setting, group in settings_of(specs).items():
        clean = results[clean_run_id(setting.target, setting.outer_loops)]
        correct = {"clean": clean.correct, **{s.run_id: results[s.run_id].correct for s in group}}
        robust, fooled_by = worst_case(correct)
        entry = {"robust": robust, "fooled_by": fooled_by, "runs": [s.run_id for s in group]}
        if setting.target != "undefended" and ctx.budget.rescore_runs > 0:
            x_adv = {s.run_id: results[s.run_id].x_adv for s in group if results[s.run_id].x_adv is not None}
            fallback = fallback_order(group) + list(x_adv)
            candidates, source = choose_candidates(ctx.images.cpu(), x_adv, correct, fallback)
            # The run id names the attack runs the candidates come from: another protocol set, another rescore.
            tag = f"{zlib.crc32('|'.join(entry['runs']).encode()):08x}"
            spec = RunSpec(f"rescore/{setting.id}/{tag}", "scoring", "rescore", "rescore", setting.target,
                           setting.outer_loops, group[0].eps, {"runs": ctx.budget.rescore_runs}, threat="clean")
            entry["rescore"] = rescore(ctx, spec, candidates)
            entry["candidate_source"] = source
            entry["candidates"] = candidates
        out[setting] = entry
    return out
