"""Active Defense (Algorithm 1 of the paper): engines, configuration and the defended classifier.

::

    from fsmooth.defense import defend, DefendedClassifier, DefenseConfig
    x_def = defend(model, x)                                  # eager on CPU, CUDA graphs on GPU
    clf = DefendedClassifier(model, DefenseConfig.preset("cifar10"), outer_loops=5)

Modules: ``config`` (hyperparameters, presets), ``api`` (``ActiveDefense``,
``defend``), ``eager`` (reference engine), ``graph`` (CUDA-graph runner:
buckets, slots, compaction, chunked replay), ``while_loop`` (single-launch
WHILE node), ``classifier`` (``DefendedClassifier``).
"""
from .api import ActiveDefense, DefenseDivergedWarning, DefenseNotConvergedWarning, defend
from .classifier import DefendedClassifier
from .config import DEFENSE_PRESETS, DefenseConfig
from .engines import ENGINES
from .result import DefenseResult

__all__ = ["defend", "ActiveDefense", "DefendedClassifier", "DefenseConfig", "DefenseResult", "DEFENSE_PRESETS",
           "DefenseNotConvergedWarning", "DefenseDivergedWarning", "ENGINES"]
