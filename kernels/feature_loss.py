"""Fused feature-smoothing loss and gradient (Triton).

Per sample ``i`` (one contiguous block of ``N`` elements, NCHW or channels_last)::

    m_i = mean(F_i);  L_i = mean(|F_i - m_i|);  s_i = mean(sign(F_i - m_i))
    dL_i/dF_i = (sign(F_i - m_i) - s_i) / N

Two reads of F make the forward: pass 1 sums F (per-sample mean), pass 2 sums
``|F - m|`` and ``sign(F - m)`` and, when a gradient is needed
(``HAS_GRADIENTS``), stores ``sign(F - m)`` as int8 into its own buffer (F is
an activation other layers still need, so it is never overwritten). The
gradient is kept in that factored form, ``(sign - s_i) / N``; backward reads
the int8 signs once and writes ``g_i * (sign - s_i) / N`` in F's dtype, so
the gradient costs one byte per element of extra traffic instead of a full
copy of F.

Each pass runs a ``(B, num_chunks)`` grid. Partial sums go to a
``(B, num_chunks)`` fp32 buffer reduced by ``torch.sum``: no atomics, so the
result is deterministic and a sample's loss never depends on its batch
(chunking depends on N only).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = [
    "feature_loss_forward",
    "feature_loss_backward",
    "FeatureLossFunction",
    "feature_loss_triton",
    "feature_loss_and_grad_triton",
]


@triton.jit
def _partial_sum_kernel(
    f_ptr,
    partial_ptr,
    n,
    stride_b,
    NUM_CHUNKS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 1: partial sums of each sample's features.

    Pointers: ``f_ptr`` features (any float dtype, sample ``b`` at
    ``f_ptr + b * stride_b``, ``n`` dense elements); ``partial_ptr`` fp32
    ``(B, NUM_CHUNKS)`` output.
    Constexprs: ``CHUNK`` elements per program (a multiple of ``BLOCK``),
    ``BLOCK`` elements per vector step.
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    base = f_ptr + b * stride_b
    start = c * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(base + idx, mask=idx < n, other=0.0).to(tl.float32)
        acc += x
    tl.store(partial_ptr + b * NUM_CHUNKS + c, tl.sum(acc, axis=0))


@triton.jit
def _absdev_sign_kernel(
    f_ptr,
    mean_ptr,
    abs_partial_ptr,
    sign_partial_ptr,
    sign_ptr,
    n,
    stride_b,
    NUM_CHUNKS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_GRADIENTS: tl.constexpr,
):
    """Pass 2: partial sums of ``|F - m|`` and ``sign(F - m)``; optionally the signs.

    Pointers: ``f_ptr`` features as in pass 1; ``mean_ptr`` fp32 ``(B,)``
    per-sample means; ``abs_partial_ptr``/``sign_partial_ptr`` fp32
    ``(B, NUM_CHUNKS)`` outputs; ``sign_ptr`` int8 ``(B, n)`` output, written
    only when ``HAS_GRADIENTS`` (dense, sample ``b`` at ``b * n``).
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    base = f_ptr + b * stride_b
    m = tl.load(mean_ptr + b)
    start = c * CHUNK
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sign = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n
        x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - m, 0.0)
        s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        acc_abs += tl.abs(d)
        acc_sign += s
        if HAS_GRADIENTS:
            tl.store(sign_ptr + b * n + idx, s.to(tl.int8), mask=mask)
    tl.store(abs_partial_ptr + b * NUM_CHUNKS + c, tl.sum(acc_abs, axis=0))
    tl.store(sign_partial_ptr + b * NUM_CHUNKS + c, tl.sum(acc_sign, axis=0))


@triton.jit
def _grad_kernel(
    sign_ptr,
    sign_mean_ptr,
    scale_ptr,
    out_ptr,
    n,
    stride_out_b,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Backward: ``out = scale_b * (sign - s_b)`` in the output's dtype.

    Pointers: ``sign_ptr`` int8 ``(B, n)`` signs from pass 2; ``sign_mean_ptr``
    fp32 ``(B,)`` mean sign ``s_b``; ``scale_ptr`` fp32 ``(B,)`` upstream
    gradient divided by ``n``; ``out_ptr`` gradient (F's dtype, sample ``b`` at
    ``b * stride_out_b``).
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    s_mean = tl.load(sign_mean_ptr + b)
    scale = tl.load(scale_ptr + b)
    start = c * CHUNK
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n
        s = tl.load(sign_ptr + b * n + idx, mask=mask, other=0).to(tl.float32)
        g = scale * (s - s_mean)
        tl.store(out_ptr + b * stride_out_b + idx, g.to(out_ptr.dtype.element_ty), mask=mask)


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _launch_shape(n: int) -> tuple[int, int, int]:
    """``(BLOCK, CHUNK, NUM_CHUNKS)`` for a per-sample size ``n`` (independent of the batch)."""
    block = min(1024, triton.next_power_of_2(max(n, 16)))
    # Up to 8 vector steps per program: enough work per program to hide latency,
    # enough programs per sample that batch 1 still fills the GPU.
    steps = min(8, triton.cdiv(n, block))
    chunk = block * steps
    return block, chunk, triton.cdiv(n, chunk)


def _as_dense_samples(features: torch.Tensor) -> torch.Tensor:
    """A tensor whose samples are each one dense block (NCHW or channels_last kept as is)."""
    if features.is_contiguous():
        return features
    if features.dim() == 4 and features.is_contiguous(memory_format=torch.channels_last):
        return features
    return features.contiguous()


def on_device(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device, not on the tensors' (a tensor on
    another GPU would be read through the wrong context). A no-op on the current device (the usual case, and
    inside captured graphs and compiled code)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def feature_loss_forward(features: torch.Tensor, need_grad: bool):
    """Run the fused forward.

    Returns ``(loss, sign_mean, signs)``: fp32 ``(B,)`` losses, fp32 ``(B,)``
    mean signs and the int8 ``(B, N)`` signs (``None`` unless ``need_grad``).
    ``features`` must hold dense samples (see :func:`_as_dense_samples`).
    """
    b = features.shape[0]
    n = features[0].numel()
    block, chunk, num_chunks = _launch_shape(n)
    dev = features.device
    stride_b = features.stride(0)
    grid = (b, num_chunks)
    partial = torch.empty((b, num_chunks), device=dev, dtype=torch.float32)
    with on_device(dev):
        _partial_sum_kernel[grid](features, partial, n, stride_b, NUM_CHUNKS=num_chunks, CHUNK=chunk, BLOCK=block)
    mean = partial.sum(dim=1) / n
    abs_partial = torch.empty_like(partial)
    sign_partial = torch.empty_like(partial)
    signs = torch.empty((b, n), device=dev, dtype=torch.int8) if need_grad else abs_partial
    with on_device(dev):
        _absdev_sign_kernel[grid](
            features, mean, abs_partial, sign_partial, signs, n, stride_b,
            NUM_CHUNKS=num_chunks, CHUNK=chunk, BLOCK=block, HAS_GRADIENTS=need_grad,
        )
    loss = abs_partial.sum(dim=1) / n
    sign_mean = sign_partial.sum(dim=1) / n
    return loss, sign_mean, (signs if need_grad else None)


def feature_loss_backward(
    signs: torch.Tensor, sign_mean: torch.Tensor, grad_loss: torch.Tensor, like: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient with respect to the features for upstream per-sample gradient ``grad_loss``.

    The result has the shape, dtype and memory layout of ``like``; it is
    written into ``out`` when given (a static buffer, e.g. inside a CUDA graph).
    """
    b, n = signs.shape
    block, chunk, num_chunks = _launch_shape(n)
    if out is None:
        out = torch.empty_like(like)
    scale = grad_loss.to(torch.float32).contiguous() / n
    with on_device(out.device):
        _grad_kernel[(b, num_chunks)](signs, sign_mean, scale, out, n, out.stride(0), CHUNK=chunk, BLOCK=block)
    return out


class FeatureLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward stores the factored gradient, backward only scales it."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        dense = _as_dense_samples(features)
        need_grad = ctx.needs_input_grad[0]
        loss, sign_mean, signs = feature_loss_forward(dense, need_grad)
        if need_grad:
            ctx.save_for_backward(signs, sign_mean)
            ctx.dtype, ctx.device, ctx.shape = features.dtype, features.device, dense.shape
            ctx.channels_last = dense.dim() == 4 and not dense.is_contiguous()
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        signs, sign_mean = ctx.saved_tensors
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        out = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device, memory_format=fmt)
        return feature_loss_backward(signs, sign_mean, grad_loss, out, out=out)


def feature_loss_triton(features: torch.Tensor) -> torch.Tensor:
    """Per-sample fp32 loss ``(B,)`` with autograd support."""
    return FeatureLossFunction.apply(features)


def feature_loss_and_grad_triton(
    features: torch.Tensor, grad_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample fp32 loss and the gradient ``grad_scale_i * dL_i/dF_i`` (no autograd graph).

    ``grad_scale`` (``(B,)``, default ones) lets a caller fold a per-sample
    factor, e.g. an active-sample mask, into the same pass.
    """
    dense = _as_dense_samples(features)
    loss, sign_mean, signs = feature_loss_forward(dense, need_grad=True)
    scale = torch.ones_like(loss) if grad_scale is None else grad_scale
    grad = feature_loss_backward(signs, sign_mean, scale, dense)
    return loss, grad
