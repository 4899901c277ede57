"""Latent quantization: SQNR floors per bit width, exact round trips, straight-through gradient."""

import pytest
import torch

from kvconvert.quant import (fake_quantize, fake_quantize_latent, pack_codes, pack_latent, quantize, quantize_segments,
                             unpack_codes, unpack_latent)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return (10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum())).item()


# Uniform quantization of Gaussian data over a group's min..max range: about 6 dB per bit, minus the
# range-to-rms loss. A correct implementation reaches 45-48 dB at 8 bits, 20.7-23.6 dB at 4 bits and 6.8-9.6 dB at
# 2 bits for groups of 64-16 here; the floors sit ~3 dB under, where a wrong scale, zero-point or rounding lands.
SQNR_FLOOR_DB = {8: 42.0, 4: 18.0, 2: 4.0}


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [16, 32, 64])
def test_sqnr_floor(bits, group):
    x = torch.randn(37, 128, generator=torch.Generator().manual_seed(0))
    assert sqnr_db(x, fake_quantize(x, bits, group)) >= SQNR_FLOOR_DB[bits]


def test_smaller_groups_are_more_accurate():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 10, 256)
    assert sqnr_db(x, fake_quantize(x, 4, 16)) > sqnr_db(x, fake_quantize(x, 4, 128)) + 1.0


def test_16_bits_is_identity():
    x = torch.randn(5, 64)
    assert fake_quantize(x, 16, 32) is x


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_pack_unpack_equals_fake_quant(bits):
    """What the cache stores and returns is bit-for-bit what the model's forward used."""
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(2)).half().float()
    stored = pack_latent(x, bits, 32)
    assert torch.equal(unpack_latent(stored, bits, 32, torch.float32), fake_quantize(x, bits, 32))


@pytest.mark.parametrize("bits", [4, 2])
def test_packing_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (4, 16), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (4, 16 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_packing_layout():
    """Value PACK*i + j sits in bits [j*bits, (j+1)*bits) of byte i: the layout the Triton kernels read."""
    codes = torch.tensor([[1, 2, 3, 0, 2, 2, 0, 1]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 2 | 2 << 2 | 1 << 6]]
    assert pack_codes(codes, 4).tolist() == [[1 | 2 << 4, 3, 2 | 2 << 4, 1 << 4]]


def test_segmented_latent_quantizes_each_segment_at_its_bits():
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(3))
    y = fake_quantize_latent(x, [(32, 4), (64, 2)], 32)
    assert torch.equal(y[..., :32], fake_quantize(x[..., :32], 4, 32))
    assert torch.equal(y[..., 32:], fake_quantize(x[..., 32:], 2, 32))
    assert torch.equal(fake_quantize_latent(x, [(96, 4)], 32), fake_quantize(x, 4, 32))


def test_straight_through_gradient():
    x = torch.randn(4, 32, requires_grad=True)
    fake_quantize(x, 4, 32).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_codes_stay_in_range_on_constant_groups():
    x = torch.full((2, 32), 3.25)
    y = fake_quantize(x, 4, 32)
    assert torch.allclose(y, x, atol=1e-3)


def test_quantize_segments_equals_one_quantize_per_segment():
    """One pass over a latent's head and tail gives bit for bit the codes, scales and zeros of one `quantize` per
    segment, ties, constant groups and fp16-subnormal scales included (the decode path quantizes this way)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 96, generator=gen) * torch.logspace(-6, 2, 96)
    x[0, 0, :32] = 0.1  # a constant group: its scale underflows to the 1e-8 floor
    x[1, 1, 32:64] = torch.arange(32) * 0.25 + 0.125  # exact ties at the 2-bit tail's scale
    segments = [(32, 4), (64, 2)]
    codes, scale, zero = quantize_segments(x, segments, 16)
    lo = 0
    for width, bits in segments:
        c, s, z = quantize(x[..., lo : lo + width], bits, 16)
        assert torch.equal(codes[..., lo : lo + width], c)
        assert torch.equal(scale[..., lo // 16 : (lo + width) // 16], s)
        assert torch.equal(zero[..., lo // 16 : (lo + width) // 16], z)
        lo += width


def test_quantize_tables_made_in_inference_mode_serve_training():
    """The shift and level tables are cached per device; one first made inside the runtime (inference mode) must
    not turn a later training forward's tensors into inference tensors."""
    from kvconvert import quant

    quant._SHIFT_TABLES.clear()
    quant._QMAX_TABLES.clear()
    with torch.inference_mode():
        pack_codes(torch.zeros(1, 8, dtype=torch.uint8), 4)
        quantize_segments(torch.randn(1, 48), [(16, 4), (32, 2)], 16)
    x = torch.randn(2, 48, requires_grad=True)
    codes, scale, _ = quantize_segments(x, [(16, 4), (32, 2)], 16)  # raised before: inference tensors saved
    assert not codes.is_inference() and not pack_codes(codes[:, :16], 4).is_inference()
    fake_quantize_latent(x, [(16, 4), (32, 2)], 16).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
