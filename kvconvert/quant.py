"""Group-wise asymmetric quantization of the latent, as the cache stores it.

Layout: the last dim (R values) splits into R / group groups; each group stores `bits`-bit codes (8, 4 or 2) plus an
fp16 scale and an fp16 zero-point (the group minimum). Dequantized value = code * scale + zero. Below 8 bits the codes
are packed little-end first: value PACK*i + j in bits [j*bits, (j+1)*bits) of byte i (PACK = 8 // bits).
The model's forward calls `fake_quantize` so that what is evaluated and trained is what the cache will return.
"""

from __future__ import annotations

import torch


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., R) float -> codes (..., R) uint8, scale (..., R/group) fp16, zero (..., R/group) fp16."""
    if bits >= 16:
        raise ValueError("quantize is for 8, 4 and 2 bits; 16-bit latents are stored as they are")
    return _quantize_groups(x, (1 << bits) - 1, group)


_QMAX_TABLES: dict[tuple, torch.Tensor] = {}


def quantize_segments(x: torch.Tensor, segments: list[tuple[int, int]], group: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize` of consecutive segments [(width, bits), ...] of x's last dim (each width a multiple of the group,
    each below 16 bits) in one pass: the same codes, scales and zeros as one `quantize` per segment."""
    key = (tuple(segments), group, x.device)
    if key not in _QMAX_TABLES:
        levels = [float((1 << bits) - 1) for width, bits in segments for _ in range(width // group)]
        with torch.inference_mode(False):  # see _shifts
            _QMAX_TABLES[key] = torch.tensor(levels, dtype=torch.float32, device=x.device)[:, None]
    return _quantize_groups(x, _QMAX_TABLES[key], group)


def _quantize_groups(x: torch.Tensor, qmax: int | torch.Tensor, group: int):
    """qmax: the largest code, one for every group or per group ((R/group, 1) fp32)."""
    shape = x.shape
    xg = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = torch.aminmax(xg, dim=-1)
    # Scales and zero-points are stored in fp16: round them first so codes are chosen against stored values.
    zero = lo.to(torch.float16)
    zero32 = zero.float()[..., None]
    scale = ((hi[..., None] - zero32) / qmax).clamp_min_(1e-8).to(torch.float16)
    codes = ((xg - zero32) / scale.float()).round_().clamp_min_(0)
    codes = codes.clamp_max_(qmax) if isinstance(qmax, int) else torch.minimum(codes, qmax)
    return codes.to(torch.uint8).reshape(shape), scale[..., 0], zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`: codes (..., R) uint8 with scale/zero (..., R/group) -> (..., R) in `dtype`. (Not
    through `dequantize_codes`' stacked pairs: CPU autocast refuses to stack float16 tensors.)"""
    shape = codes.shape
    x = codes.float().reshape(*shape[:-1], shape[-1] // group, group) * scale.float()[..., None] + zero.float()[..., None]
    return x.reshape(shape).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize then dequantize with a straight-through gradient; identity at 16 bits."""
    if bits >= 16:
        return x
    codes, scale, zero = quantize(x.detach(), bits, group)
    xq = dequantize(codes, scale, zero, group, x.dtype)
    return x + (xq - x).detach()


_SHIFT_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    """(8 // bits,) uint8: the bit offset of each value packed in a byte (one table per width and device)."""
    key = (bits, device)
    if key not in _SHIFT_TABLES:
        with torch.inference_mode(False):  # a table made inside the runtime must still serve training code
            _SHIFT_TABLES[key] = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
    return _SHIFT_TABLES[key]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., R) uint8 codes < 2^bits -> (..., R * bits / 8) uint8 (see the module docstring); 8 bits: as they are."""
    if bits == 8:
        return codes
    per = 8 // bits
    parts = codes.unflatten(-1, (codes.shape[-1] // per, per))
    return (parts << _shifts(bits, codes.device)).sum(-1, dtype=torch.uint8)  # the parts' bits are disjoint: sum = OR


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`."""
    if bits == 8:
        return packed
    return ((packed[..., None] >> _shifts(bits, packed.device)) & ((1 << bits) - 1)).flatten(-2)


def pack_latent(latent: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """What the cache stores for latents (..., R): at 16 bits the values in fp16 (bf16 when given bf16);
    below, codes (packed 8 // bits per byte) and `latent_scales` (..., R/group, 2) fp16 = (scale, zero)."""
    if bits >= 16:
        return {"latent": latent if latent.dtype in (torch.float16, torch.bfloat16) else latent.half()}
    codes, scale, zero = quantize(latent, bits, group)
    return {"latent": pack_codes(codes, bits), "latent_scales": torch.stack((scale, zero), dim=-1)}


def unpack_latent(stored: dict[str, torch.Tensor], bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `pack_latent`: the latent values the attention reads."""
    if bits >= 16:
        return stored["latent"].to(dtype)
    return dequantize_codes(unpack_codes(stored["latent"], bits), stored["latent_scales"], group, dtype)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` with the stored (scale, zero) pairs: codes (..., R) uint8, scales (..., R/group, 2) fp16; the
    same values in fewer ops."""
    shape = codes.shape
    scales = scales.float()
    x = codes.float().reshape(*shape[:-1], shape[-1] // group, group) * scales[..., :1] + scales[..., 1:]
    return x.reshape(shape).to(dtype)


def fake_quantize_latent(c: torch.Tensor, segments: list[tuple[int, int]], group: int) -> torch.Tensor:
    """`fake_quantize` of a latent stored in segments: [(width, bits), ...] over its last dim, in order."""
    if len(segments) == 1:
        return fake_quantize(c, segments[0][1], group)
    parts, lo = [], 0
    for width, bits in segments:
        parts.append(fake_quantize(c[..., lo : lo + width], bits, group))
        lo += width
    return torch.cat(parts, -1)
