"""Per-channel affine map ``y = x * scale[c] + shift[c]`` on channels-last tensors (Triton).

Why a kernel for so little arithmetic: a bf16 prefix copy runs its eval BatchNorms as this map
(:mod:`fsmooth.defense.prefix_state`), and ATen runs ``addcmul`` with a per-channel operand, and the
backward's product with it, through its generic strided ``elementwise_kernel``: a broadcast operand keeps
them off the vectorized path. On an H200 those two took 23% of the graph engine's kernel time at batch 512
(``bench/README.md``, third run). A channels-last tensor is a dense ``(rows, C)`` matrix with the channel
fastest, so a 2-D block of rows x channels loads ``scale`` and ``shift`` once per block and streams ``x``
with contiguous, aligned rows.

fp32 arithmetic whatever the storage dtype, one rounding (to nearest, ties to even) at the store: ``addcmul``'s
own arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .feature_loss import on_device

__all__ = ["channel_affine", "ChannelAffineFunction", "channel_affine_function", "supports"]

_MAX_BLOCK_C = 256
_BLOCK_ELEMENTS = 4096


@triton.jit
def _round_to_bf16(y):
    """fp32 ``y`` rounded to the nearest bf16 (ties to even), still as fp32: the cast that follows is exact.

    The GPU's own fp32 -> bf16 conversion rounds so too; Triton's CPU interpreter truncates, so without this
    the interpreted kernel (CI's) would not compute what the GPU does. NaN stays NaN.
    """
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(y != y, y, bits.to(tl.float32, bitcast=True))


@triton.jit
def _channel_affine_kernel(
    x_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    rows,
    C,
    HAS_SHIFT: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``y[r, c] = x[r, c] * scale[c] (+ shift[c])`` on dense row-major ``(rows, C)`` views.

    Grid ``(cdiv(rows, BLOCK_R), cdiv(C, BLOCK_C))``; ``scale``/``shift`` are ``(C,)`` of any float dtype.
    """
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    offsets = r[:, None] * C + c[None, :]
    mask = (r[:, None] < rows) & c_mask[None, :]
    y = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * scale[None, :]
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        y = y + shift[None, :]
    if ROUND_BF16:
        y = _round_to_bf16(y)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def supports(x: torch.Tensor) -> bool:
    """Whether ``x`` has the layout the kernel reads: 4-D channels-last dense, or 2-D ``(N, C)`` contiguous."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 2 and x.is_contiguous()


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``x * scale + shift`` per channel (dim 1) of a channels-last ``x``, in ``x``'s dtype and layout."""
    if not supports(x):
        raise ValueError(f"x must be a 4-D channels_last or a 2-D contiguous tensor, got shape {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    channels = x.shape[1]
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.dim() != 1 or t.shape[0] != channels or t.device != x.device
                              or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous ({channels},) tensor on {x.device}, got shape "
                             f"{tuple(t.shape)} on {t.device}")
    y = torch.empty_like(x)  # preserve_format: channels_last stays channels_last
    if x.numel() == 0:
        return y
    rows = x.numel() // channels
    block_c = min(_MAX_BLOCK_C, max(16, triton.next_power_of_2(channels)))
    block_r = max(1, _BLOCK_ELEMENTS // block_c)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(channels, block_c))
    with on_device(x.device):
        _channel_affine_kernel[grid](x, scale, shift if shift is not None else scale, y, rows, channels,
                                     HAS_SHIFT=shift is not None, ROUND_BF16=x.dtype == torch.bfloat16,
                                     BLOCK_R=block_r, BLOCK_C=block_c)
    return y


class ChannelAffineFunction(torch.autograd.Function):
    """Differentiable in ``x`` only (the prefix copy's ``scale`` and ``shift`` are frozen buffers)."""

    @staticmethod
    def forward(ctx, x, scale, shift):
        ctx.save_for_backward(scale)
        return channel_affine(x, scale, shift)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        if supports(grad):
            return channel_affine(grad, scale), None, None
        shape = (1, -1) + (1,) * (grad.dim() - 2)  # another layout: ATen's product (strided, still correct)
        return (grad * scale.view(shape)).to(grad.dtype), None, None


def channel_affine_function(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    return ChannelAffineFunction.apply(x, scale, shift)
