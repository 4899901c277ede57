# Grid (B * T,): one program quantizes one token row x[b, t, :W] and writes it in place at cache slot
# (start[b] + t) % CAP (a sliding-window group's ring wraps around its capacity). Below 16 bits the row is a
# (BLOCK_G groups, BLOCK_K units) tile, a unit being one stored byte: one value at 8 bits, PACK = 8 // bits values
# (value PACK*k + j in bits [j*bits, (j+1)*bits)) below; per group lo/hi = min/max, fp16 zero and scale,
# code = clamp(rint((x - zero) / scale), 0, qmax): bit-identical to `kvconvert.quant.quantize`.
"""Triton quantize-and-append into the latent cache: `quantize_append_triton`, same semantics and bits as
`quantize_append_ref` (reference.py). CUDA-graph safe: positions come from the `start` tensor, no host sync."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cache_layout import Stream

# 1.5 * 2^23: x + C - C rounds fp32 x to an integer, half to even (torch.round), exactly for |x| < 2^22. Larger
# |x| only happens far outside [0, qmax] and is clamped anyway. Works in the interpreter, which has no libdevice.
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize_units(x, valid, QMAX: tl.constexpr):
    """rint and clamp to [0, QMAX] like torch.round(...).clamp_(0, qmax).to(uint8): NaN (0/0 in a constant group
    whose fp16 scale underflowed) -> 0, as torch's NaN -> uint8 cast gives on CPU."""
    v = (x + _RINT_MAGIC) - _RINT_MAGIC
    v = tl.minimum(tl.where(v > 0.0, v, 0.0), QMAX)  # NaN compares false: -> 0
    return tl.where(valid, v, 0.0).to(tl.uint8)


@triton.jit
def _quantize_append_kernel(
    # pointers
    X, START, DATA, SCALES,
    # sizes
    T, CAP,
    # strides
    stride_x_b, stride_x_t, stride_x_w,
    stride_data_b, stride_data_s, stride_data_w,
    stride_scales_b, stride_scales_s, stride_scales_g, stride_scales_k,
    # meta
    W: tl.constexpr,  # the stream's width: a compile-time constant, so its masks fold and its loads vectorize
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // T
    t = row % T
    pos = (tl.load(START + b).to(tl.int64) + t) % CAP
    x_row = X + b.to(tl.int64) * stride_x_b + t * stride_x_t
    data_row = DATA + b.to(tl.int64) * stride_data_b + pos * stride_data_s

    if BITS >= 16:
        offs_w = tl.arange(0, BLOCK_W)
        mask_w = offs_w < W
        x = tl.load(x_row + offs_w * stride_x_w, mask=mask_w, other=0).to(tl.float32)
        tl.store(data_row + offs_w * stride_data_w, x.to(DATA.dtype.element_ty), mask=mask_w)
    else:
        QMAX: tl.constexpr = (1 << BITS) - 1
        PACK: tl.constexpr = 8 // BITS if BITS < 8 else 1  # values per stored byte
        UNITS: tl.constexpr = GROUP // PACK  # stored bytes per group
        offs_g = tl.arange(0, BLOCK_G)
        offs_k = tl.arange(0, BLOCK_K)
        mask_g = offs_g < W // GROUP
        valid = mask_g[:, None] & (offs_k < UNITS)[None, :]
        first = offs_g[:, None] * GROUP + offs_k[None, :] * PACK  # value index of the unit's first value
        lo = tl.full((BLOCK_G,), float("inf"), tl.float32)
        hi = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        for j in tl.static_range(PACK):
            xj = tl.load(x_row + (first + j) * stride_x_w, mask=valid, other=0).to(tl.float32)
            lo = tl.minimum(lo, tl.min(tl.where(valid, xj, float("inf")), 1))
            hi = tl.maximum(hi, tl.max(tl.where(valid, xj, float("-inf")), 1))
        # scale and zero are stored in fp16: round them first so codes are chosen against the stored values;
        # div_rn: IEEE division like torch (Triton's `/` on fp32 is approximate on GPU)
        zero = lo.to(tl.float16)
        zero_f = zero.to(tl.float32)
        scale = tl.maximum(tl.math.div_rn(hi - zero_f, tl.full(hi.shape, QMAX, tl.float32)), 1e-8).to(tl.float16)
        scale_f = tl.broadcast_to(scale.to(tl.float32)[:, None], (BLOCK_G, BLOCK_K))
        codes = tl.zeros((BLOCK_G, BLOCK_K), tl.uint8)
        for j in tl.static_range(PACK):  # the row again (from cache): a unit's values, packed into its byte
            xj = tl.load(x_row + (first + j) * stride_x_w, mask=valid, other=0).to(tl.float32)
            codes = codes | (_quantize_units(tl.math.div_rn(xj - zero_f[:, None], scale_f), valid, QMAX) << (BITS * j))
        unit = offs_g[:, None] * UNITS + offs_k[None, :]
        tl.store(data_row + unit * stride_data_w, codes, mask=valid)
        scales_row = SCALES + b.to(tl.int64) * stride_scales_b + pos * stride_scales_s + offs_g * stride_scales_g
        tl.store(scales_row, scale, mask=mask_g)
        tl.store(scales_row + stride_scales_k, zero, mask=mask_g)


def quantize_append_triton(stream: Stream, x: torch.Tensor, start: torch.Tensor) -> None:
    """Triton `quantize_append_ref`: quantize x (B, T, W) fp32/fp16/bf16 into `stream` at slots
    (start[b] + t) % capacity (start: (B,) int32), in place."""
    B, T, W = x.shape
    if W != stream.width:
        raise ValueError(f"x has {W} values per token, the stream {stream.width}")
    if T > stream.data.shape[1]:
        raise ValueError(f"{T} tokens do not fit a stream of {stream.data.shape[1]} slots at once")
    if B * T == 0:
        return
    bits, group = stream.bits, stream.group
    if bits >= 16:
        scales, stride_scales = stream.data, (0, 0, 0, 0)
        block_g = block_k = 1
        group = 1
    else:
        pack = 8 // bits if bits < 8 else 1
        if bits not in (2, 4, 8) or W % group or group % pack:
            raise ValueError(f"cannot quantize width {W} at {bits} bits with group {group}")
        scales, stride_scales = stream.scales, stream.scales.stride()
        block_g = triton.next_power_of_2(W // group)
        block_k = triton.next_power_of_2(group // pack)
    _quantize_append_kernel[(B * T,)](
        x, start, stream.data, scales,
        T, stream.data.shape[1],
        *x.stride(),
        *stream.data.stride(),
        *stride_scales,
        W=W, BITS=bits, GROUP=group, BLOCK_W=triton.next_power_of_2(W), BLOCK_G=block_g, BLOCK_K=block_k,
        num_warps=4 if W >= 512 else 1,
        enable_fp_fusion=False,  # never contract into FMAs: codes must equal torch's bit for bit
    )
