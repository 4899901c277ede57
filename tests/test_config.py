"""The plan in CllaConfig: validation, and the KV byte formula against the tensors the model caches."""

import pytest
import torch

from kvconvert.config import CllaConfig, kv_bytes_breakdown, kv_bytes_per_token, source_kv_bytes_per_token
from kvconvert.model import CllaForCausalLM
from kvconvert.quant import pack_latent

from conftest import VOCAB


def compressed_config(bits: int, **kw) -> CllaConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        layer_groups=[[0], [1, 2, 3]],  # uneven groups
        kv_latent_dim=32,
        qk_nope_dim=8,
        rope_dim=8,
        rope_heads=1,
        rope_freq_index=[[[0, 2, 5, 7]], [[1, 3, 4, 6]]],
        kv_bits=bits,
        kv_quant_group=16,
        source_kv_bytes_per_token=source_kv_bytes_per_token(4, 2, 16),
    )
    return CllaConfig(**(base | kw))


@pytest.mark.parametrize("bits, rope_bits, qk_norm", [(16, 16, False), (8, 16, False), (4, 16, False), (4, 8, False),
                                                     (8, 8, False), (4, 4, False), (4, 8, True), (16, 16, True)])
@torch.no_grad()
def test_byte_formula_equals_cached_tensors(bits, rope_bits, qk_norm):
    cfg = compressed_config(bits, rope_bits=rope_bits, qk_norm=qk_norm)
    torch.manual_seed(0)
    model = CllaForCausalLM(cfg).eval()
    T = 11
    out = model(torch.randint(0, VOCAB, (2, T)), use_cache=True)
    stored_bytes = 0
    for g in range(cfg.num_layer_groups):
        latent, k_rope = out.cache.layers[g].keys, out.cache.layers[g].values
        stored = pack_latent(latent[:, 0], cfg.kv_bits, cfg.kv_quant_group)
        rope = pack_latent(k_rope, cfg.rope_bits, cfg.rope_quant_group)
        stored |= {"rope_keys": rope["latent"]} | ({"rope_scales": rope["latent_scales"]} if cfg.rope_bits < 16 else {})
        stored_bytes += sum(t.numel() * t.element_size() for t in stored.values())
    if qk_norm:  # a 16-bit key norm per layer and kv head, after the groups' entries
        for layer in out.cache.layers[cfg.num_layer_groups:]:
            assert layer.keys.shape == (2, cfg.num_key_value_heads, T, 1)
            stored_bytes += layer.keys.numel() * 2
        assert len(out.cache.layers) == cfg.num_layer_groups + cfg.num_hidden_layers
    assert all(out.cache.get_seq_length(g) == T for g in range(cfg.num_layer_groups))
    assert stored_bytes == kv_bytes_per_token(cfg) * 2 * T


def test_byte_formula_by_hand():
    # 2 groups x (32 latent values at 4 bits = 16 B, 2 quant groups x (scale + zero) x 2 B = 8 B, 1 x 8 rope x 2 B = 16 B)
    assert kv_bytes_breakdown(compressed_config(4)) == {
        "latent": 32, "latent_scales": 16, "rope_keys": 32, "rope_scales": 0, "key_scales": 0}
    # qk_norm: 4 layers x 2 kv heads x 2 B of key norms
    assert kv_bytes_breakdown(compressed_config(4, qk_norm=True))["key_scales"] == 16
    # rope keys at 8 bits: 2 groups x (8 B + one head x (scale + zero) x 2 B)
    assert kv_bytes_breakdown(compressed_config(4, rope_bits=8))["rope_keys"] == 16
    assert kv_bytes_breakdown(compressed_config(4, rope_bits=8))["rope_scales"] == 8
    assert kv_bytes_per_token(compressed_config(8)) == 2 * (32 + 8 + 16)
    assert kv_bytes_per_token(compressed_config(16)) == 2 * (64 + 16)
    assert source_kv_bytes_per_token(30, 3, 64) == 23_040  # SmolLM2-135M, as in DESIGN.md
    # a 2-bit tail: per group 16 values at 4 bits (8 B) + 16 at 2 bits (4 B), one quant group each (2 x 4 B)
    tail = compressed_config(4, kv_tail_dim=16)
    assert tail.group_segments(0) == [(16, 4), (16, 2)]
    assert kv_bytes_breakdown(tail) == {
        "latent": 24, "latent_scales": 16, "rope_keys": 32, "rope_scales": 0, "key_scales": 0}
    # a whole 2-bit latent: 32 values = 8 B per group
    assert kv_bytes_breakdown(compressed_config(2))["latent"] == 16
    # groups of their own widths: 16 @ 4 (8 B + 4 B of scales) and 48 @ 4 + 16 @ 2 (24 + 4 B, 12 + 4 B of scales)
    uneven = compressed_config(4, kv_latent_dims=[16, 64], kv_tail_dims=[0, 16])
    assert uneven.group_segments(0) == [(16, 4)] and uneven.group_segments(1) == [(48, 4), (16, 2)]
    assert (uneven.kv_latent_dim, uneven.kv_tail_dim, uneven.uneven_latent) == (64, 16, True)
    assert kv_bytes_breakdown(uneven) == {
        "latent": 8 + 24 + 4, "latent_scales": 4 + 12 + 4, "rope_keys": 32, "rope_scales": 0, "key_scales": 0}
    assert uneven.describe_latent() == "16–48 @ 4 + 0–16 @ 2 bit, per layer group"
    assert tail.describe_latent() == "16 @ 4 + 16 @ 2 bit" and not tail.uneven_latent


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(layer_groups=[[0], [2, 3], [1]]), "cover layers"),
        (dict(layer_groups=[[0, 2], [1, 3]]), "cover layers"),
        (dict(kv_bits=3), "kv_bits"),
        (dict(kv_latent_dim=30), "multiple of kv_quant_group"),
        (dict(rope_dim=7), "rope_dim must be even"),
        (dict(rope_heads=3, rope_freq_index=[[[0, 1, 2, 3]] * 3] * 2), "rope_heads"),
        (dict(rope_freq_index=[[[0, 1, 2, 99]], [[0, 1, 2, 3]]]), "rope_freq_index"),
        (dict(rope_freq_index=[[[0, 1, 2, 3]]]), "rope_freq_index"),
        (dict(rope_bits=3), "rope_bits"),
        (dict(kv_tail_dim=32), "kv_tail_dim"),
        (dict(kv_tail_dim=16, kv_tail_bits=4), "kv_tail_bits"),
        (dict(kv_tail_dim=8), "multiple of kv_quant_group"),
        (dict(kv_bits=2, kv_quant_group=2), "multiple of 4"),
        (dict(kv_latent_dims=[32]), "one entry per layer group"),
        (dict(kv_latent_dims=[32, 24]), r"multiple of kv_quant_group 16 \(layer group 1\)"),
        (dict(kv_latent_dims=[32, 48], kv_tail_dims=[32, 16]), r"kv_tail_dim .* \(layer group 0\)"),
    ],
)
def test_invalid_plans_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        compressed_config(4, **kw)


def test_config_round_trips_through_json(tmp_path):
    cfg = compressed_config(4)
    cfg.save_pretrained(tmp_path)
    again = CllaConfig.from_pretrained(tmp_path)
    for key in ("layer_groups", "kv_latent_dim", "rope_freq_index", "kv_bits", "kv_quant_group", "rope_inv_freq"):
        assert getattr(again, key) == getattr(cfg, key)
    uneven = compressed_config(4, kv_latent_dims=[16, 64], kv_tail_dims=[0, 16])
    uneven.save_pretrained(tmp_path / "uneven")
    again = CllaConfig.from_pretrained(tmp_path / "uneven")
    assert [again.group_segments(g) for g in range(2)] == [uneven.group_segments(g) for g in range(2)]
