"""Small GGUF files of every supported family, written by the tests themselves with the `gguf` package: the layout
llama.cpp's converter gives them (tensor names from gguf's own map; Llama's query and key rows interleaved for its
RoPE kernels; Gemma's norm gains stored as 1 + w), so that transformers' GGUF loader, which undoes those, reads back
the model that was written.

A GGUF carries only what its metadata says, so the tiny models here keep to what transformers reads from it: no
Llama biases, Qwen3's default head dim (128), Gemma 3's default layer pattern and query scale. Mistral's GGUFs carry
the llama architecture (llama.cpp writes them so) and load as Llama."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import tiny_source

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
# what a GGUF can say of each family (tiny_source's awkward extras that no GGUF key carries, switched off)
GGUF_OVERRIDES = {
    "llama": dict(attention_bias=False, mlp_bias=False, tie_word_embeddings=False),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(),
    "qwen3": dict(attention_bias=False, head_dim=128),
    "gemma3_text": dict(attention_bias=False, num_hidden_layers=6, query_pre_attn_scalar=256, layer_types=None,
                        rope_parameters=None),
}


def gguf_source(arch: str, seed: int = 0):
    """tiny_source(arch) as a GGUF can describe it."""
    return tiny_source(arch, seed, **GGUF_OVERRIDES[arch])


def interleave_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Llama's q/k rows as GGUF stores them: per head, the two rotated halves interleaved (row i of the first half,
    then row i of the second)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_theta(cfg) -> float:
    params = cfg.rope_parameters
    if "rope_theta" not in params:  # per layer type (Gemma 3): the global layers' base is the model's
        params = params["full_attention"]
    return float(params["rope_theta"])


def write_gguf(model, path: Path, arch: str) -> Path:
    """Write `model` (a transformers causal LM of family `arch`) as an fp32 GGUF file at `path`."""
    import gguf

    name = GGUF_ARCH[arch]
    cfg = model.config
    w = gguf.GGUFWriter(str(path), name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_vocab_size(cfg.vocab_size)
    if name == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if name == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[name]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        g = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        a = t.detach().float().numpy().copy()
        if name == "llama" and g.endswith("attn_q.weight"):
            a = interleave_rope_rows(a, cfg.num_attention_heads)
        elif name == "llama" and g.endswith("attn_k.weight"):
            a = interleave_rope_rows(a, cfg.num_key_value_heads)
        elif name == "gemma3" and g.endswith("norm.weight"):
            a = a + np.float32(1.0)
        w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def save_gguf(tmp_path: Path, arch: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    model = gguf_source(arch, seed)
    return write_gguf(model, tmp_path / f"tiny-{arch}.gguf", arch), model
