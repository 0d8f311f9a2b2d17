"""Triton kernels of fsmooth, installed as ``fsmooth.kernels``.

* :mod:`.feature_loss`: the fused feature-smoothing loss and its factored gradient;
* :mod:`.channel_affine`: the per-channel affine map that a bf16 prefix copy's eval BatchNorms run as.

Importing them imports Triton; :mod:`fsmooth.functional` and :mod:`fsmooth.defense.prefix_state` do so lazily
and fall back to PyTorch (:mod:`fsmooth.reference`, ``addcmul``) when Triton is unavailable.
"""
