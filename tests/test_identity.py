"""The identity conversion reproduces its source: the test that proves the model code right."""

import pytest
import torch

from kvconvert.config import kv_bytes_per_token
from kvconvert.convert.identity import build_identity

from conftest import VOCAB, tiny_source


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@torch.no_grad()
def test_identity_logits_match_source(arch):
    src = tiny_source(arch)
    clla = build_identity(src, arch, "tiny")
    ids = torch.randint(0, VOCAB, (3, 29), generator=torch.Generator().manual_seed(1))  # > mistral's window of 7
    assert max_rel_err(src(ids).logits, clla(ids).logits) <= 1e-5
    cfg = clla.config
    # a qk-norm source's keys are cached before their norm, plus one 16-bit key norm per layer and kv head
    extra = cfg.num_hidden_layers * cfg.num_key_value_heads * 2 if cfg.qk_norm else 0
    assert kv_bytes_per_token(cfg) == cfg.source_kv_bytes_per_token + extra


@torch.no_grad()
def test_identity_padded_batch_matches_source(arch):
    src = tiny_source(arch)
    clla = build_identity(src, arch, "tiny")
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding on row 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    a = src(ids, attention_mask=mask, position_ids=pos).logits
    b = clla(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    assert max_rel_err(a[keep], b[keep]) <= 1e-5


@torch.no_grad()
def test_identity_generate_equals_source_greedy(arch):
    src = tiny_source(arch)
    clla = build_identity(src, arch, "tiny")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=src.config.pad_token_id)
    assert torch.equal(src.generate(ids, **kw), clla.generate(ids, **kw))


@torch.no_grad()
def test_cached_decode_equals_full_forward(arch):
    """Prefill + one-token steps through the cache give the logits of one full forward pass."""
    clla = build_identity(tiny_source(arch), arch, "tiny")
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(4))
    full = clla(ids).logits
    out = clla(ids[:, :10], use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(10, 15):
        out = clla(ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    assert max_rel_err(full, torch.cat(steps, 1)) <= 1e-5


def test_identity_refuses_mismatched_biases():
    from kvconvert.errors import KvconvertError

    src = tiny_source("llama", attention_bias=False)
    src.config.attention_bias = True  # config claims biases the weights do not have
    with pytest.raises(KvconvertError, match="biases"):
        build_identity(src, "llama", "tiny")


def test_a_cache_is_handed_to_each_forward_under_the_keyword_it_takes():
    """cache_kwargs: `cache` for a forward that takes it (this transformers' sources; CLLA models take both), else
    `past_key_values`; the source fills the cache it is given."""
    import inspect

    from transformers import DynamicCache

    from kvconvert.convert.source import cache_kwargs

    src = tiny_source("llama")
    cache = DynamicCache()
    kw = cache_kwargs(src, cache)
    assert list(kw) == ["cache" if "cache" in inspect.signature(src.forward).parameters else "past_key_values"]
    src(torch.zeros(1, 5, dtype=torch.long), **kw, use_cache=True)
    assert cache.get_seq_length() == 5
    assert list(cache_kwargs(build_identity(src, "llama", "tiny"), cache)) == ["cache"]

    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return past_key_values

    assert cache_kwargs(Older(), cache) == {"past_key_values": cache}
