"""`kvconvert profile memory` (analytic): figures checked against real models and by hand."""

import json

from typer.testing import CliRunner

from kvconvert.cli import app
from kvconvert.config import kv_bytes, kv_bytes_per_token
from kvconvert.convert.identity import build_identity, identity_config
from kvconvert.runtime import LatentRuntime
from kvconvert.runtime.profile import GIB, clla_param_count, memory_profile, source_param_count

from conftest import save_source, tiny_source

runner = CliRunner()


def test_param_counts_match_real_models(arch):
    src = tiny_source(arch)
    cfg = identity_config(src.config, arch, "tiny")
    assert source_param_count(cfg) == sum(p.numel() for p in src.parameters())
    clla = build_identity(src, arch, "tiny")
    assert clla_param_count(cfg) == sum(p.numel() for p in clla.parameters())


def test_memory_profile_by_hand():
    cfg = identity_config(tiny_source("qwen2").config, "qwen2", "tiny")
    per_token = kv_bytes_per_token(cfg)
    assert per_token == 3 * 2 * 2 * 16 * 2  # layers x (K, V) x kv heads x head dim x 2 bytes
    p = memory_profile(cfg, context=1000, batch=3, budget_gib=0.001, weight_bytes_per_param=2)
    assert p["converted"]["kv_bytes_total"] == per_token * 3000
    free = int(0.001 * GIB) - p["converted"]["weights_bytes"]
    assert p["converted"]["max_context_at_batch"] == min(free // (per_token * 3), cfg.max_position_embeddings)
    wide = memory_profile(cfg, context=100, batch=1, budget_gib=1, weight_bytes_per_param=2)
    assert wide["converted"]["max_context_at_batch"] == cfg.max_position_embeddings  # the model's positions bound it
    assert p["converted"]["max_batch_at_context"] == free // (per_token * 1000)
    assert p["kv_ratio"] == 1.0


def test_memory_profile_counts_sliding_windows():
    """Gemma 3's sliding-window layers: the converted figure counts their rings (what LatentRuntime allocates), the
    source's its windows; the fits come out of those sizes, not of a per-token rate."""
    src = tiny_source("gemma3_text")
    cfg = identity_config(src.config, "gemma3_text", "tiny")
    windows = cfg.layer_windows
    assert any(w is not None for w in windows) and any(w is None for w in windows)
    context, batch = 500, 2  # the tiny model's 512 positions; rings of window + 99 slots as a runtime keeps
    p = memory_profile(cfg, context=context, batch=batch, budget_gib=0.001, weight_bytes_per_param=2, ring_chunk=100)
    rt = LatentRuntime(build_identity(src, "gemma3_text", "tiny"), batch, context, ring_chunk=100)
    assert p["converted"]["kv_bytes_total"] == rt.cache.nbytes == kv_bytes(cfg, context, 100) * batch
    assert p["converted"]["kv_bytes_total"] < kv_bytes_per_token(cfg) * context * batch
    per_layer = cfg.source_kv_bytes_per_token // cfg.num_hidden_layers
    assert p["source"]["kv_bytes_total"] == batch * per_layer * sum(context if w is None else w for w in windows)
    free = int(0.001 * GIB) - p["converted"]["weights_bytes"]
    p = memory_profile(cfg, context=context, batch=batch, budget_gib=0.0004, weight_bytes_per_param=2, ring_chunk=100)
    free = int(0.0004 * GIB) - p["converted"]["weights_bytes"]
    n = p["converted"]["max_context_at_batch"]
    assert 0 < n < cfg.max_position_embeddings
    assert kv_bytes(cfg, n, 100) * batch <= free < kv_bytes(cfg, n + 1, 100) * batch
    assert p["converted"]["max_batch_at_context"] == free // kv_bytes(cfg, context, 100)


def test_profile_cli_on_source_and_converted(tmp_path):
    src, _ = save_source(tmp_path, "llama")
    out = tmp_path / "clla"
    assert runner.invoke(app, ["convert", str(src), str(out), "--identity"]).exit_code == 0
    a = runner.invoke(app, ["profile", "memory", str(src), "--json", "--context", "4096", "--batch", "2"])
    b = runner.invoke(app, ["profile", "memory", str(out), "--json", "--context", "4096", "--batch", "2"])
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["kind"].startswith("source") and jb["kind"] == "converted"
    assert ja["kv_bytes_per_token"] == jb["kv_bytes_per_token"]
    assert jb["converted"]["kv_bytes_total"] == jb["kv_bytes_per_token"]["total"] * 4096 * 2
    table = runner.invoke(app, ["profile", "memory", str(out)])
    assert table.exit_code == 0 and "rope_keys" in table.stdout and "ratio" in table.stdout
    assert "latent (32 @ 16 bit)" in table.stdout  # identity: the values of 2 kv heads x 16 dims, 16-bit
    tail = tmp_path / "tail"
    assert runner.invoke(app, ["convert", str(src), str(tail), "--latent-dim", "64", "--kv-tail-dim", "32", "--kv-bits",
                               "4", "--quant-group", "16", "--calib-tokens", "512"]).exit_code == 0
    jt = json.loads(runner.invoke(app, ["profile", "memory", str(tail), "--json"]).stdout)
    assert jt["latent_segments"][0] == [{"width": 32, "bits": 4}, {"width": 32, "bits": 2}]
    assert "latent (32 @ 4 + 32 @ 2 bit)" in runner.invoke(app, ["profile", "memory", str(tail)]).stdout


def test_source_decode_time_does_not_carry_the_prefill(monkeypatch):
    """time_source's decode is the time between the tokens generate hands out, whatever the prefill costs: here a
    fake clock makes every prefill take a different time (10 s, 13 s, ...) and every decode step 0.5 s."""
    import time

    from kvconvert.runtime.profile import time_source

    model = tiny_source("llama")
    clock, prefills = [0.0], iter([10.0, 13.0, 11.0, 17.0])
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def generate(ids, max_new_tokens, streamer=None, **kw):
        put = streamer.put if streamer is not None else (lambda value: None)
        put(ids)  # the prompt, before any work
        clock[0] += next(prefills)
        for i in range(max_new_tokens):
            clock[0] += 0.5 if i else 0.0  # the first token comes with the prefill
            put(ids[:, :1])

    monkeypatch.setattr(model, "generate", generate)
    r = time_source(model, 2, 64, steps=8)
    assert r["decode_step_ms"] == 500.0
    assert r["prefill_tokens_per_s"] == 2 * 64 / 13.0  # the timed (second) call's prefill


def test_decode_flops_by_hand():
    """FLOPs of a decode step, by hand: two per weight read, and per slot and layer the absorbed attention's dot
    products; rope keys from the latent add their rebuild (2 R Wr) and rotation (3 Wr) per slot and layer."""
    from kvconvert.runtime.profile import attention_flops_per_slot, decode_flops_per_step

    from test_runtime import FROM_LATENT, tiny_clla

    for rope_from_latent in (False, True):
        kw = dict(rope_from_latent=True, rope_bits=16, **FROM_LATENT["per kv head"]) if rope_from_latent else {}
        model = tiny_clla(4, **kw)
        cfg = model.config
        H, Wr = cfg.num_attention_heads, cfg.rope_heads * cfg.rope_dim
        per_slot = attention_flops_per_slot(cfg)
        for i, g in enumerate(cfg.group_of_layer()):
            R = cfg.kv_latent_dims[g]
            want = 2 * H * Wr + 2 * H * R + (2 * H * R if cfg.qk_nope_dim else 0)
            assert per_slot[i] == want + ((2 * R * Wr + 3 * Wr) if rope_from_latent else 0)
        embed = model.get_input_embeddings().weight
        tied = model.get_output_embeddings().weight is embed
        weights = sum(p.numel() for p in model.parameters() if tied or p is not embed)
        attended = [50 if w is None else min(50, w) for w in cfg.layer_windows]  # layer 1 slides over 6 tokens
        assert decode_flops_per_step(model, 3, 50) == 3 * (2 * weights + sum(n * f for n, f in zip(attended, per_slot)))
