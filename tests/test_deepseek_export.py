"""DeepSeek-V3 export: transformers' own DeepseekV3ForCausalLM loads the folder and computes what the CLLA model does."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from kvconvert.config import CllaConfig
from kvconvert.convert.deepseek import deepseek_v3_reasons, export_deepseek_v3, rope_theta
from kvconvert.convert.export import write_model
from kvconvert.errors import KvconvertError
from kvconvert.model import CllaForCausalLM

from conftest import VOCAB, byte_tokenizer

HEAD = 16


def deepseek_plan(**overrides) -> CllaConfig:
    """One latent per layer, one shared rope key of 8 dims keeping every other frequency of a 16-dim head (a
    standard RoPE of base 10000 over 8 dims), a normed 24-wide latent, GQA 4:2, 16-bit cache."""
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=HEAD, kv_latent_dim=24, qk_nope_dim=HEAD, rope_dim=8, rope_heads=1,
        rope_freq_index=[[[0, 2, 4, 6]] for _ in range(3)], latent_norm=True, initializer_range=0.1,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=257,
    ) | overrides
    return CllaConfig(**kw)


def save_clla(tmp_path, cfg: CllaConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = CllaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # a gain that is not 1 catches a norm mapped to the wrong place
    folder = tmp_path / "clla"
    folder.mkdir()
    write_model(folder, model, byte_tokenizer(), model.generation_config, torch.float32)
    return folder, model


def test_rope_theta_reads_the_kept_frequencies():
    assert rope_theta(deepseek_plan()) == pytest.approx(10000.0, rel=1e-6)
    # the first four frequencies of a 16-dim RoPE of base 10000 are a standard 8-dim RoPE of base 100
    assert rope_theta(deepseek_plan(rope_freq_index=[[[0, 1, 2, 3]] for _ in range(3)])) == pytest.approx(100.0)
    assert rope_theta(deepseek_plan(rope_freq_index=[[[0, 1, 3, 5]] for _ in range(3)])) is None  # not geometric
    assert rope_theta(deepseek_plan(rope_freq_index=[[[0, 2, 4, 6]], [[0, 2, 4, 6]], [[0, 1, 2, 3]]])) is None


@pytest.mark.parametrize("tied", [False, True])
def test_deepseek_v3_loads_the_export_and_matches(tmp_path, tied):
    folder, model = save_clla(tmp_path, deepseek_plan(tie_word_embeddings=tied))
    assert deepseek_v3_reasons(model.config) == []
    export_deepseek_v3(folder, tmp_path / "ds")
    ds = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ds").eval()
    assert ds.config.model_type == "deepseek_v3" and ds.config.kv_lora_rank == 24
    # stored as DeepSeek's own checkpoints are (vLLM relies on both): rope pairs interleaved, the LM head untied
    assert ds.config.rope_interleave and not ds.config.tie_word_embeddings
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in ds.model.layers)  # dense, no MoE
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, ds(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    prompt = ids[:1, :9]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=257, eos_token_id=None)
    assert ds.generate(prompt, **kw).tolist() == model.generate(prompt, **kw).tolist()


def test_export_never_replaces_its_own_model(tmp_path):
    folder, _ = save_clla(tmp_path, deepseek_plan())
    with pytest.raises(KvconvertError, match="would replace the model it reads"):
        export_deepseek_v3(folder, folder, force=True)
    assert (folder / "model.safetensors").is_file()


@pytest.mark.parametrize("overrides, reason", [
    (dict(layer_groups=[[0, 1], [2]], rope_freq_index=[[[0, 2, 4, 6]]] * 2), "share a latent"),
    (dict(rope_heads=2, qk_nope_dim=8, rope_freq_index=[[[0, 1, 2, 3]] * 2] * 3), "one rope key"),
    (dict(latent_norm=False), "RMSNorm on the latent"),
    (dict(kv_bits=4, kv_quant_group=8), "quantized"),
    (dict(kv_latent_dims=[24, 16, 32]), "latents of different widths"),
    (dict(qkv_bias=True), "biases"),
])
def test_plans_outside_the_format_are_refused_with_the_reason(tmp_path, overrides, reason):
    folder, _ = save_clla(tmp_path, deepseek_plan(**overrides))
    with pytest.raises(KvconvertError, match=reason):
        export_deepseek_v3(folder, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_convert_target_deepseek_v3_then_export_end_to_end(tmp_path):
    """A bias-free tiny Llama converted with --target deepseek-v3 exports, and DeepseekV3ForCausalLM reproduces the
    converted model (logits and greedy tokens); the CLI prints one line per refusal."""
    from typer.testing import CliRunner

    from kvconvert.cli import app
    from kvconvert.loading import load_clla

    from conftest import save_source

    runner = CliRunner()
    src, _ = save_source(tmp_path, "llama", attention_bias=False, mlp_bias=False)
    out, dest = tmp_path / "out", tmp_path / "ds"
    r = runner.invoke(app, ["convert", str(src), str(out), "--kv-ratio", "0.9", "--target", "deepseek-v3",
                            "--calib-tokens", "512"])
    assert r.exit_code == 0, r.output
    model = load_clla(out).model
    cfg = model.config
    assert cfg.latent_norm and cfg.rope_heads == 1 and cfg.kv_bits == 16 and all(len(g) == 1 for g in cfg.layer_groups)
    r = runner.invoke(app, ["export", str(out), str(dest), "--format", "deepseek-v3", "--json"])
    assert r.exit_code == 0, r.output
    ds = DeepseekV3ForCausalLM.from_pretrained(dest).eval()
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model(ids).logits, ds(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=257, eos_token_id=None)
    assert ds.generate(ids[:1, :7], **kw).tolist() == model.generate(ids[:1, :7], **kw).tolist()
    # refusals: a source with biases, a contradicting override, an export of a plan outside the format
    (tmp_path / "b").mkdir()
    biased, _ = save_source(tmp_path / "b", "llama")  # conftest's Llama has every bias
    for args, needle in (
        (["convert", str(biased), str(tmp_path / "x"), "--kv-ratio", "0.9", "--target", "deepseek-v3"], "biases"),
        (["convert", str(src), str(tmp_path / "x"), "--kv-ratio", "0.9", "--target", "deepseek-v3", "--kv-bits", "4"], "--kv-bits 16"),
        (["convert", str(src), str(tmp_path / "x"), "--kv-ratio", "0.9", "--target", "deepseek-v3", "--kv-tail-dim", "32"],
         "--kv-tail-dim 0"),
        (["convert", str(src), str(tmp_path / "x"), "--kv-ratio", "0.9", "--target", "deepseek-v3", "--rope-keys", "latent"],
         "--rope-keys cached"),
        (["convert", str(src), str(tmp_path / "x"), "--kv-ratio", "0.9", "--target", "mla"], "--target must be one of"),
        (["convert", str(src), str(tmp_path / "x"), "--kv-ratio", "0.9", "--target", "deepseek-v3", "--rope-dim", "2"], "at least 4"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code not in (0, None) and needle in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "x").exists()
