"""Executes one :class:`RunSpec` chunk by chunk: seeded, resumable, sharded over ranks.

Every chunk ``c`` of every run is seeded from ``(seed, run_id, c)`` alone, so
the result does not depend on which rank ran it, on the order of the runs,
or on whether the evaluation was interrupted and resumed.
"""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
import zlib
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .._machine import machine
from ..defense import DefenseDivergedWarning
from ..distributed import Claims, all_gather_object
from . import attacks as attack_classes
from .autoattack import autoattack_settings, build_autoattack, run_autoattack
from .protocols import Budget, RunSpec
from .resumable import batch_slices, run_attack
from .store import ChunkStore, tensor_checksum

_log = logging.getLogger(__name__)
CANDIDATES_KEY = "candidates_sha256"  # in a rescore chunk's JSON: the checksum of the points it re-scored

__all__ = ["Context", "RunResult", "execute", "rescore", "chunk_seed", "other_settings", "work_ahead"]


def chunk_seed(seed: int, run_id: str, chunk: int) -> int:
    return zlib.crc32(f"{seed}/{run_id}/{chunk}".encode()) & 0x7FFFFFFF


@dataclass
class Context:
    """Everything a run needs: models, data (float [0, 1] on ``device``), budgets, state and sharding."""

    model: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    defense_config: object
    defended_factory: object
    budget: Budget = field(default_factory=Budget)
    baseline_model: torch.nn.Module | None = None
    baseline_config: object = None
    layer: str | None = None
    seed: int = 0
    chunk_size: int = 250
    batch_size: int = 250
    store: ChunkStore = field(default_factory=lambda: ChunkStore(None))
    rank: int = 0
    world: int = 1
    quiet: bool = False
    num_classes: int = 10
    attacks_frozen: bool = False  # a partial report: attack chunks are read, never computed
    _classifiers: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.labels.shape[0]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n / self.chunk_size)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def batch_for(self, target: str, outer_loops: int) -> int:
        """Images per forward/attack call: ``batch_size`` divided by K, as the defended batch holds K copies."""
        return max(1, self.batch_size // max(outer_loops, 1))

    def base_model(self, target: str) -> torch.nn.Module:
        return self.baseline_model if target == "standard-defended" else self.model

    def defense_for(self, target: str):
        return self.baseline_config if target == "standard-defended" else self.defense_config

    def classifier(self, target: str, outer_loops: int):
        key = (target, outer_loops)
        if key not in self._classifiers:
            if target == "undefended":
                clf = self.model
            else:
                if target == "standard-defended" and self.baseline_model is None:
                    raise ValueError("the standard-defended baseline needs baseline_model")
                clf = self.defended_factory(self.base_model(target), self.defense_for(target), outer_loops,
                                            self.layer)
            self._classifiers[key] = clf
        return self._classifiers[key]


@dataclass
class RunResult:
    """A finished run over all ``n`` images (merged over ranks)."""

    spec: RunSpec
    pred: torch.Tensor
    correct: torch.Tensor
    iterations: torch.Tensor          # mean defense iterations per image; -1 where not measured
    # per image: 1 where the defense's divergence guard fired in the forward that scored it (in any of the K
    # copies; AutoAttack's own verdict stands, so there the fresh forward on its points), 0 where not, -1 where
    # not reported (an undefended classifier, a chunk saved before 2026-11-27)
    diverged: torch.Tensor | None = None
    x_adv: torch.Tensor | None = None
    correct_runs: torch.Tensor | None = None   # rescoring: (runs, n)
    wall_s: float = 0.0
    flags: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seeds: list = field(default_factory=list)
    machines: list = field(default_factory=list)  # [{"machine": ..., "chunks": [...]}], see _machines


def _per_image(info, name: str, batch: int, reduce) -> torch.Tensor:
    """``reduce`` over the K copies of the last forward's ``name`` per image; -1 when not reported."""
    value = getattr(info, name, None)
    if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.numel() % max(batch, 1):
        return torch.full((batch,), -1.0)
    return reduce(value.detach().float().cpu().reshape(-1, batch))


def _scored(clf, x: torch.Tensor) -> dict:
    """Predicted labels, and from the defense's report of that forward (``clf.last_info``), per image: the mean
    defense iterations over the K copies and whether the divergence guard fired in any (``-1``: not reported)."""
    with torch.no_grad():
        pred = clf(x).argmax(1)
    info, b = getattr(clf, "last_info", None), x.shape[0]
    return {"pred": pred.cpu(), "iterations": _per_image(info, "iterations", b, lambda v: v.mean(0)),
            "diverged": _per_image(info, "diverged", b, lambda v: v.amax(0))}


def _scored_batched(clf, x: torch.Tensor, batch: int) -> dict:
    parts = [_scored(clf, x[s]) for s in batch_slices(x.shape[0], batch)]
    return {key: torch.cat([p[key] for p in parts]) for key in ("pred", "iterations", "diverged")}


def _attack(ctx: Context, spec: RunSpec, clf, seed: int):
    options = dict(spec.options.get("kwargs", {}))
    cls = getattr(attack_classes, spec.options["name"])
    if cls is attack_classes.AdaptiveAPGD:
        options.setdefault("delta", ctx.defense_for(spec.target).delta)
        options.setdefault("layer", ctx.layer)
        return cls(clf, ctx.base_model(spec.target), eps=spec.eps, seed=seed, **options)
    return cls(clf, eps=spec.eps, seed=seed, **options)


def _note_resumed(meta: dict, info: dict, keys: tuple, device) -> None:
    """A chunk resumed from saved progress says where it went on (``info``'s ``keys``), with the time and the
    other machines spent on it before."""
    if not info["resumed"]:
        return
    meta.update({key: info[key] for key in keys}, earlier_wall_s=info["earlier_wall_s"])
    earlier = [m for m in info["earlier_machines"] if m != machine(device)]
    if earlier:
        meta["resumed_from_machines"] = earlier


def _run_chunk(ctx: Context, spec: RunSpec, clf, x, y, seed: int, sources: dict, lo: int, hi: int, chunk: int,
               candidates: torch.Tensor | None = None):
    meta: dict = {}
    batch = ctx.batch_for(spec.target, spec.outer_loops)
    if spec.kind == "clean":
        return _scored_batched(clf, x, batch), meta
    if spec.kind == "autoattack":
        aa = build_autoattack(clf, spec.eps, version=spec.options["version"], attacks=spec.options["attacks"],
                              budget=ctx.budget, num_classes=ctx.num_classes, seed=seed, device=x.device)
        x_adv, y_adv, flags, info = run_autoattack(aa, x, y, batch_size=batch,
                                                   progress=ctx.store.progress(spec.run_id, chunk))
        meta.update(settings=autoattack_settings(aa), flags=flags)
        _note_resumed(meta, info, ("resumed_after", "resumed_in"), x.device)
        # AutoAttack's verdict stands; one fresh forward on its points measures the defense iterations.
        got = _scored_batched(clf, x_adv, batch)
        return {**got, "pred": y_adv.cpu(), "x_adv": x_adv.cpu()}, meta
    if spec.kind == "attack":
        attack = _attack(ctx, spec, clf, seed)
        x_adv, info = run_attack(attack, x, y, batch_size=batch, progress=ctx.store.progress(spec.run_id, chunk))
        meta["settings"] = attack.settings()
        _note_resumed(meta, info, ("resumed_at",), x.device)
    elif spec.kind == "transfer":
        x_adv = sources[spec.source].x_adv[lo:hi].to(x.device)
        meta["settings"] = {"source": spec.source, **sources[spec.source].settings}
    elif spec.kind == "rescore":
        candidates = candidates[lo:hi].to(x.device)
        runs = spec.options["runs"]
        got = []
        for r in range(runs):
            torch.manual_seed(chunk_seed(seed, f"run{r}", chunk))
            got.append(_scored_batched(clf, candidates, batch))
        meta["settings"] = {"runs": runs}
        pred = torch.stack([g["pred"] for g in got])
        return {"pred": pred[0].clone(), "iterations": torch.stack([g["iterations"] for g in got]),
                "diverged": torch.stack([g["diverged"] for g in got]), "pred_runs": pred}, meta
    else:
        raise ValueError(f"unknown run kind {spec.kind!r}")
    return {**_scored_batched(clf, x_adv, batch), "x_adv": x_adv.detach().cpu()}, meta


def other_settings(ctx: Context, spec: RunSpec, chunk: int, meta: dict) -> str | None:
    """Why finished chunk ``chunk`` of ``spec`` (its JSON: ``meta``) is not this run's result, or ``None`` when it
    is: a chunk of an attack run (kind ``"attack"``) records its attack's settings, and one attacked with others
    (another budget, or saved before a setting existed whose default has changed since) is recomputed, never
    merged."""
    if spec.kind != "attack":
        return None
    clf = ctx.classifier(spec.target, spec.outer_loops)
    attack = _attack(ctx, spec, clf, chunk_seed(ctx.seed, spec.run_id, chunk))
    saved = meta.get("settings")
    if attack.same_settings(saved):
        return None
    return f"it was attacked with other settings ({saved}; now {attack.settings()})"


def execute(ctx: Context, spec: RunSpec, sources: dict | None = None, *,
            candidates: torch.Tensor | None = None, ahead: dict | None = None) -> RunResult:
    """Run (or load) this rank's chunks of ``spec``, gather all ranks' and merge them.

    ``sources``: the finished runs a transfer run scores the points of; ``candidates``: the images a
    rescore run scores (see :func:`rescore`); ``ahead``: this rank's chunks of ``spec`` that
    :func:`work_ahead` made (``{chunk: (tensors, meta)}``; every rank passes one, or none does).
    """
    if (spec.kind == "rescore") != (candidates is not None):
        raise ValueError("a rescore run, and only a rescore run, takes candidates")
    sources = sources or {}
    if ahead is not None:
        local = dict(ahead)
    else:
        local = {c: _chunk(ctx, spec, c, sources, candidates) for c in _claimed(ctx, ctx.n_chunks, spec.run_id)}
    if ctx.world > 1:
        merged = {}
        for part in all_gather_object(local):
            merged.update(part)
        local = merged
    return _merge(ctx, spec, [local[c] for c in range(ctx.n_chunks)])


# The run kinds whose chunks need no other run's result (transfer runs score a source run's points; a rescore
# run, the candidates chosen from all the runs of its setting).
INDEPENDENT = ("clean", "attack", "autoattack")


def work_ahead(ctx: Context, specs: list[RunSpec]) -> dict[str, dict]:
    """Under ``torchrun``: the chunks of every run of ``specs`` that needs no other run's result, shared out over
    the ranks as one list (plan order), run or read back as :func:`execute` would.

    Shared out run by run, a rank done with one run's chunks waits at the run's gather for a rank still in a slow
    chunk (a Square chunk whose images survive runs for hours); here it takes the next run's chunk instead. Each
    chunk is seeded from ``(seed, run_id, c)`` as ever, so the results are the same. Returns this rank's chunks
    by run id (a run it took none of: ``{}``), for ``execute(..., ahead=...)``, which gathers them; ``{}`` with
    one process or for a partial report (its chunks are read, in order). A rank whose peer has failed goes on
    through its share of the list before it waits at the first gather (the chunks it saves are kept).
    """
    if ctx.world == 1 or ctx.attacks_frozen:
        return {}
    items = [(spec, c) for spec in specs if spec.kind in INDEPENDENT for c in range(ctx.n_chunks)]
    done: dict[str, dict] = {spec.run_id: {} for spec, _ in items}
    if ctx.rank == 0:
        _log.info("working ahead: %d chunks of %d runs shared out over %d ranks", len(items), len(done),
                  ctx.world)
    for i in _claimed(ctx, len(items), "chunks"):
        spec, c = items[i]
        done[spec.run_id][c] = _chunk(ctx, spec, c, {}, None)
    return done


def _claimed(ctx: Context, n: int, desc: str):
    """This rank's items of ``0 .. n - 1``, whichever are next when it is free (:class:`Claims`): each is marked
    finished when the loop asks for the next; rank 0 shows the progress of all ranks."""
    claims = Claims(n)
    bar = tqdm(total=n, desc=desc, disable=ctx.quiet or ctx.rank != 0, leave=False)
    for item in claims:
        yield item
        claims.finish()
        bar.update(claims.done() - bar.n)
    bar.close()


def _chunk(ctx: Context, spec: RunSpec, c: int, sources: dict, candidates: torch.Tensor | None) -> tuple:
    """``(tensors, meta)`` of chunk ``c`` of ``spec``: read back when it has finished for this evaluation, with
    this run's settings and (a rescore run) on these candidates; else computed, seeded from ``(seed, run_id, c)``,
    and saved."""
    lo, hi = c * ctx.chunk_size, min((c + 1) * ctx.chunk_size, ctx.n)
    got = ctx.store.load(spec.run_id, c)
    if (got is not None and spec.kind == "rescore"
            and got[1].get(CANDIDATES_KEY) != tensor_checksum(candidates[lo:hi])):
        # The stamp covers the clean images, not the points re-scored: an attack chunk recomputed since, or
        # another choice of candidates, makes the stored fresh runs those of other points.
        _log.info("recomputing chunk %d of %r: the points it re-scored are not this evaluation's", c, spec.run_id)
        got = None
    if got is not None:
        other = other_settings(ctx, spec, c, got[1])
        if other is not None:
            warnings.warn(f"recomputing chunk {c} of {spec.run_id!r}: {other}", RuntimeWarning, stacklevel=3)
            got = None
    if got is not None:
        return got
    if ctx.attacks_frozen and spec.kind not in ("clean", "rescore"):
        raise RuntimeError(f"partial report: chunk {c} of {spec.run_id!r} cannot be used (see the warning "
                           "above); a partial report attacks nothing, so it stops here")
    clf = ctx.classifier(spec.target, spec.outer_loops)
    seed = chunk_seed(ctx.seed, spec.run_id, c)
    torch.manual_seed(seed)  # the defense noise and the attack libraries draw from the global RNG
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Counted from the defense's own report instead (iterations and the diverged column in the
        # report, a line per chunk below); one per forward pass would drown the log.
        warnings.filterwarnings("ignore", message=r".*reached max_iters.*")
        warnings.filterwarnings("ignore", category=DefenseDivergedWarning)
        tensors, meta = _run_chunk(ctx, spec, clf, ctx.images[lo:hi], ctx.labels[lo:hi], seed, sources,
                                   lo, hi, c, candidates)
    tripped = int((tensors["diverged"] > 0).sum()) if "diverged" in tensors else 0
    if tripped:
        _log.info("chunk %d of %r: %d of its %d scoring forwards tripped the defense's divergence guard "
                  "(the report's diverged column)", c, spec.run_id, tripped, tensors["diverged"].numel())
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    # A chunk resumed from its saved progress also counts the time spent before the interruption.
    wall_s = meta.pop("earlier_wall_s", 0.0) + time.perf_counter() - start
    meta.update(wall_s=wall_s, seed=seed, lo=lo, hi=hi, machine=machine(ctx.device))
    if spec.kind == "rescore":
        meta[CANDIDATES_KEY] = tensor_checksum(candidates[lo:hi])
    ctx.store.save(spec.run_id, c, tensors, meta)
    return tensors, meta


def rescore(ctx: Context, spec: RunSpec, candidates: torch.Tensor) -> RunResult:
    """The re-scoring step: ``spec.options["runs"]`` fresh defense runs on each of ``candidates``
    (one adversarial image per test image), chunked, seeded and resumable like every run."""
    return execute(ctx, spec, candidates=candidates)


def _machines(metas: list) -> list:
    """Which chunks ran on which machine (``None``: chunks saved before chunks recorded it); a chunk of
    AutoAttack resumed from progress saved elsewhere also names the machines before (``resumed_from``)."""
    groups: dict = {}
    for c, m in enumerate(metas):
        got, earlier = m.get("machine"), m.get("resumed_from_machines", [])
        entry = {"machine": got, "chunks": []} | ({"resumed_from": earlier} if earlier else {})
        groups.setdefault(json.dumps([got, earlier], sort_keys=True), entry)["chunks"].append(c)
    return list(groups.values())


def _merge(ctx: Context, spec: RunSpec, chunks: list) -> RunResult:
    def cat(key, dim=0):
        parts = [t[key] for t, _ in chunks if key in t]
        return torch.cat(parts, dim) if parts else None

    def cat_or_unknown(key):
        """Along the images (the last dim); -1 for a chunk saved before it held ``key``."""
        if not any(key in t for t, _ in chunks):
            return None
        like = next(t[key] for t, _ in chunks if key in t)
        return torch.cat([t[key] if key in t else torch.full((*like.shape[:-1], t["pred"].shape[-1]), -1.0)
                          for t, _ in chunks], -1)

    metas = [m for _, m in chunks]
    labels = ctx.labels.cpu()
    pred = cat("pred") if chunks else torch.zeros(0, dtype=torch.int64)
    flags: list = []
    for m in metas:
        for f in m.get("flags", []):
            if f not in flags:
                flags.append(f)
    result = RunResult(spec=spec, pred=pred, correct=pred == labels,
                       iterations=cat("iterations", -1) if chunks else torch.zeros(0),
                       diverged=cat_or_unknown("diverged"),
                       wall_s=sum(m["wall_s"] for m in metas), flags=flags,
                       settings=metas[0].get("settings", {}) if metas else {},
                       seeds=[m["seed"] for m in metas], machines=_machines(metas))
    x_adv = cat("x_adv")
    if spec.kind == "clean":
        x_adv = ctx.images.cpu()
    result.x_adv = x_adv
    runs = cat("pred_runs", 1)
    if runs is not None:
        result.correct_runs = runs == labels[None]
    return result
