"""Triton kernels of fsmooth, installed as ``fsmooth.kernels``.

Importing this package imports Triton; :mod:`fsmooth.functional` does so lazily
and falls back to :mod:`fsmooth.reference` when Triton is unavailable.
"""
