"""Evaluation protocols: which attacks run on which classifier at which eps.

A protocol expands to :class:`RunSpec` s. Targets: ``"defended"`` (the model
with Active Defense, ``outer_loops`` K), ``"undefended"`` (the bare model)
and ``"standard-defended"`` (the baseline model trained without ``L_F``, with
Active Defense at the paper's larger threshold). Run ids are unique and
stable, so the same run requested by two protocols executes once and a
resumed evaluation finds its saved chunks.

Protocols
  clean        the clean passes alone (bare model, defended at each K); every protocol includes them.
  paper        AutoAttack standard, and each of its attacks alone (Table 1 columns).
  autoattack   AutoAttack standard alone: paper's first run (same run id, so a finished one is reused),
               for a report while the attacks alone are still running.
  adaptive     APGD-CE on CE + lam * max(L_F, delta), lam = 0 and +-``Budget.lambdas`` (Table 3); an image
               it does not fool comes back as its highest-loss point, not clean (also in eps-sweep).
  rand         AutoAttack rand (APGD-CE, APGD-DLR, EOT over ``eot_draws``).
  eot          PGD with EOT through the straight-through gradient: CE and targeted DLR.
  eot-transfer eot at the first K only; at each further K, those points scored through the defense with K
               runs (``eot-pgd-*-from-ol<first K>``, a transfer across K: it does not adapt to K, and costs
               a defended forward per point instead of an attack through K defense runs).
  transfer     points found on the undefended model, scored on the defended one: AutoAttack standard's
               (``transfer``), and APGD-CE's highest-loss point of every image (``transfer-maxloss``; AutoAttack
               leaves the images the bare model gets wrong clean, and those must be attacked too).
  square       Square alone (gradient-masking check against the white-box attacks): paper's run of it.
  fab-t        FAB-T alone: paper's run of it (so the one attack a session can afford runs by itself).
  eps-sweep    APGD-CE at 2, 4, 8, 16, 32 / 255: accuracy must fall towards 0.
  torchattacks torchattacks.EOTPGD at the first eps and outer loop (independent library).
  baselines    AutoAttack standard on the undefended model and on the standard model + Active Defense.
Groups: ``beyond`` (rand, eot, transfer, square, eps-sweep, torchattacks) and ``all``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

__all__ = ["Budget", "RunSpec", "Setting", "PROTOCOLS", "GROUPS", "plan", "parse_protocols", "setting_key",
           "clean_run_id", "carried_column", "carried_from"]

PROTOCOLS = ("clean", "paper", "autoattack", "adaptive", "rand", "eot", "eot-transfer", "transfer", "square",
             "fab-t", "eps-sweep", "torchattacks", "baselines")
EOT_LOSSES = ("ce", "dlr-targeted")
GROUPS = {"beyond": ("rand", "eot", "transfer", "square", "eps-sweep", "torchattacks"),
          "all": PROTOCOLS[1:]}


@dataclass(frozen=True)
class Budget:
    """Attack budgets. Defaults are the published settings; every report records the ones used."""

    apgd_iter: int = 100            # AutoAttack APGD-CE/-T/-DLR and the adaptive APGD
    fab_iter: int = 100
    square_queries: int = 5000
    eot_draws: int = 20             # AutoAttack rand, EOT-PGD, torchattacks
    pgd_steps: int = 100
    pgd_restarts: int = 2
    pgd_targets: int = 3            # targeted DLR: most likely wrong classes
    lambdas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)   # log-spaced; run with both signs, and lam = 0
    adaptive_eot_draws: int = 1     # the paper's adaptive APGD-CE uses none; more only makes it stronger
    eps_sweep: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255)
    sweep_eot_draws: int = 1
    rescore_runs: int = 5           # 0: no re-scoring

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("lambdas", "eps_sweep"):
                upper = 1.0 if f.name == "eps_sweep" else math.inf
                if (not isinstance(value, tuple) or not value
                        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= upper
                               or not math.isfinite(v) for v in value)):
                    what = "numbers in (0, 1] (eps in [0, 1] units)" if f.name == "eps_sweep" else "positive numbers"
                    raise ValueError(f"Budget.{f.name} must be a non-empty tuple of {what}, got {value!r}")
                continue
            lowest = 0 if f.name == "rescore_runs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"Budget.{f.name} must be an integer >= {lowest}, got {value!r}")

    @classmethod
    def tiny(cls) -> "Budget":
        """Smallest budgets that still exercise every code path (tests, smoke runs). Not for results."""
        return cls(apgd_iter=5, fab_iter=3, square_queries=20, eot_draws=2, pgd_steps=4, pgd_restarts=1,
                   pgd_targets=2, lambdas=(0.1, 100.0), eps_sweep=(2 / 255, 8 / 255, 32 / 255), rescore_runs=3)

    def replace(self, **changes) -> "Budget":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class Setting:
    """Where an attack runs: classifier ``target``, its ``outer_loops`` K, ``eps`` ([0, 1] units) and ``attack``.

    The one place run ids are made: :attr:`id` is ``target/olK/epsE`` (E in 1/255 units) plus
    ``/attack`` when it names one. Settings are equal when their eps agree to 1e-6 / 255, so an eps
    computed twice (``8 / 255`` from the command line and from the sweep) is one setting.
    """

    target: str
    outer_loops: int
    eps: float
    attack: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "outer_loops", int(self.outer_loops))
        object.__setattr__(self, "eps", float(self.eps))

    @property
    def eps_255(self) -> float:
        return round(self.eps * 255, 6)

    @property
    def key(self) -> tuple:
        return (self.target, self.outer_loops, self.eps_255, self.attack)

    def __eq__(self, other) -> bool:
        return isinstance(other, Setting) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def id(self) -> str:
        base = f"{self.target}/ol{self.outer_loops}/eps{self.eps_255:g}"
        return base if self.attack is None else f"{base}/{self.attack}"

    def with_attack(self, attack: str | None) -> "Setting":
        return dataclasses.replace(self, attack=attack)


@dataclass
class RunSpec:
    """One attack (or clean pass) on one classifier at one eps, executed chunk by chunk.

    ``kind``: ``"clean"``, ``"autoattack"`` (``options``: version, attacks),
    ``"attack"`` (``options``: name and kwargs of a class in :mod:`.attacks`)
    or ``"transfer"`` (scores the points of run ``source``). ``threat`` sorts runs for the
    gradient-masking check: black-box and transfer attacks must not beat the white-box ones;
    composite runs (AutoAttack, which contains Square) take no side.
    """

    run_id: str
    protocol: str
    column: str
    kind: str
    target: str
    outer_loops: int
    eps: float
    options: dict = field(default_factory=dict)
    source: str | None = None
    threat: str = "white-box"   # "white-box", "black-box", "transfer", "composite" (AutoAttack), "clean"

    @property
    def setting(self) -> Setting:
        """The setting this run belongs to (its attack left out): the runs a worst case is taken over."""
        return Setting(self.target, self.outer_loops, self.eps)


def setting_key(target: str, outer_loops: int, eps: float) -> tuple:
    """``(target, K, eps in 1/255 units rounded)``: :attr:`Setting.key` without the attack."""
    return Setting(target, outer_loops, eps).key[:3]


def clean_run_id(target: str, outer_loops: int) -> str:
    """The run id of the clean pass of ``target`` with ``outer_loops`` defense runs."""
    return f"clean/{target}/ol{outer_loops}"


_CARRIED = "-from-ol"
TRANSFER_MAXLOSS_SOURCE = "apgd-ce-maxloss"  # the transfer protocol's second run on the bare model


def carried_column(column: str, outer_loops: int) -> str:
    """The column of attack ``column``'s points (found at ``outer_loops``) scored at another K (eot-transfer)."""
    return f"{column}{_CARRIED}{outer_loops}"


def carried_from(column: str) -> str | None:
    """The attack column a :func:`carried_column` came from; ``None`` for any other column."""
    base, sep, _ = column.partition(_CARRIED)
    return base if sep else None


def parse_protocols(spec) -> list[str]:
    """``"paper,adaptive"`` / a list -> protocol names, groups expanded, order kept."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        expanded = GROUPS.get(name, (name,))
        for p in expanded:
            if p not in PROTOCOLS:
                raise ValueError(f"unknown protocol {p!r}; choose from {list(PROTOCOLS) + list(GROUPS)}")
            if p not in out:
                out.append(p)
    if not out:
        raise ValueError("protocol must name at least one protocol")
    return out


def _lambda_tag(lam: float) -> str:
    return f"{lam:+g}"


def plan(protocols, eps_list, outer_loops, budget: Budget, *, has_baseline: bool = False) -> list[RunSpec]:
    """The runs ``protocols`` need, clean passes first, without duplicates."""
    protocols = parse_protocols(protocols)
    specs: dict[str, RunSpec] = {}

    def add(spec: RunSpec) -> None:
        specs.setdefault(spec.run_id, spec)

    def clean(target: str, k: int) -> None:
        add(RunSpec(clean_run_id(target, k), "clean", "clean", "clean", target, k, 0.0, threat="clean"))

    def autoattack(protocol, target, k, eps, version="standard", attacks=None, column=None):
        name = column or (f"aa-{version}" if attacks is None else attacks[0])
        add(RunSpec(Setting(target, k, eps, name).id, protocol, name, "autoattack", target, k, eps,
                    {"version": version, "attacks": attacks},
                    threat="black-box" if name == "square" else "composite" if attacks is None else "white-box"))

    def attack(protocol, target, k, eps, column, name, **kwargs):
        add(RunSpec(Setting(target, k, eps, column).id, protocol, column, "attack", target, k, eps,
                    {"name": name, "kwargs": kwargs}))

    def eot(protocol, k, eps, loss) -> str:
        column = f"eot-pgd-{loss}"
        attack(protocol, "defended", k, eps, column, "EOTPGD", loss=loss, steps=budget.pgd_steps,
               eot_iter=budget.eot_draws, n_restarts=budget.pgd_restarts, n_target_classes=budget.pgd_targets)
        return Setting("defended", k, eps, column).id

    clean("undefended", 0)
    for k in outer_loops:
        clean("defended", k)
    first_k, first_eps = outer_loops[0], eps_list[0]
    for protocol in protocols:
        if protocol == "clean" and has_baseline:
            for k in outer_loops:
                clean("standard-defended", k)
        for k in outer_loops:
            for eps in eps_list:
                if protocol in ("paper", "autoattack"):
                    autoattack(protocol, "defended", k, eps)
                if protocol == "paper":
                    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
                        autoattack(protocol, "defended", k, eps, attacks=[name])
                elif protocol == "adaptive":
                    # lam = 0 is APGD-CE through the same oracle: the control the other lambdas are read against.
                    for lam in sorted({0.0} | {s * abs(v) for v in budget.lambdas for s in (1, -1)}):
                        attack(protocol, "defended", k, eps, f"adaptive{_lambda_tag(lam)}", "AdaptiveAPGD",
                               lam=lam, n_iter=budget.apgd_iter, eot_iter=budget.adaptive_eot_draws,
                               unfooled="max-loss", attack_all=True)
                elif protocol == "rand":
                    autoattack(protocol, "defended", k, eps, version="rand")
                elif protocol == "eot":
                    for loss in EOT_LOSSES:
                        eot(protocol, k, eps, loss)
                elif protocol == "eot-transfer":
                    for loss in EOT_LOSSES:
                        source = eot(protocol, first_k, eps, loss)
                        if k != first_k:
                            column = carried_column(f"eot-pgd-{loss}", first_k)
                            add(RunSpec(Setting("defended", k, eps, column).id, protocol, column, "transfer",
                                        "defended", k, eps, source=source, threat="transfer"))
                elif protocol == "transfer":
                    # Two sets of points from the bare model: AutoAttack's, which leaves an image it need not
                    # attack (one the bare model already gets wrong) clean, and APGD-CE's highest-loss points,
                    # which move every image. Each is scored through the defense; the worst case takes both.
                    autoattack(protocol, "undefended", 0, eps)
                    attack(protocol, "undefended", 0, eps, TRANSFER_MAXLOSS_SOURCE, "APGD", loss="ce",
                           n_iter=budget.apgd_iter, best_loss=True)
                    for column, source in (("transfer", "aa-standard"), ("transfer-maxloss", TRANSFER_MAXLOSS_SOURCE)):
                        add(RunSpec(Setting("defended", k, eps, column).id, protocol, column, "transfer",
                                    "defended", k, eps, source=Setting("undefended", 0, eps, source).id,
                                    threat="transfer"))
                elif protocol in ("square", "fab-t"):  # one of the paper protocol's attacks alone
                    autoattack(protocol, "defended", k, eps, attacks=[protocol])
                elif protocol == "baselines":
                    autoattack(protocol, "undefended", 0, eps)
                    if has_baseline:
                        clean("standard-defended", k)
                        autoattack(protocol, "standard-defended", k, eps)
        if protocol == "eps-sweep":
            for eps in budget.eps_sweep:
                attack(protocol, "defended", first_k, eps, "apgd-ce-sweep", "APGD", loss="ce",
                       n_iter=budget.apgd_iter, eot_iter=budget.sweep_eot_draws, unfooled="max-loss",
                       attack_all=True)
        elif protocol == "torchattacks":
            attack(protocol, "defended", first_k, first_eps, "torchattacks-eotpgd", "TorchattacksEOTPGD",
                   steps=budget.pgd_steps, eot_iter=budget.eot_draws)
    ordered = sorted(specs.values(), key=lambda s: (s.kind != "clean", s.kind == "transfer"))
    return ordered

