"""Tiny random models of each supported architecture, built from configs (no downloads), and a byte tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import kvconvert  # noqa: F401  (registers clla)

VOCAB = 260  # 256 byte tokens + 3 special tokens + 1 spare
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHS = {
    # Llama with every bias switched on, Mistral with a sliding window shorter than the test sequences,
    # Qwen2 with its q/k/v biases, Qwen3 with its per-head query/key norms (random gains) and attention biases,
    # Gemma 3 with all of its own (scaled embeddings, four 1 + w norms per layer, a softmax scale from
    # query_pre_attn_scalar, sliding and global layers with different RoPE bases): the awkward cases of each family.
    "llama": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=7)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict()),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(attention_bias=True)),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        attention_bias=True, query_pre_attn_scalar=24, sliding_window=7,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
    )),
}


def tiny_source(arch: str, seed: int = 0, **overrides):
    """A tiny random source model: 3 layers, hidden 64, 4 heads, 2 kv heads, head dim 16, biases randomized."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=_TOK.bos_token_id,
        eos_token_id=_TOK.eos_token_id,
        pad_token_id=_TOK.pad_token_id,
    ) | extra | overrides
    model = model_cls(config_class_instance := config_cls(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # zero biases would hide a bias that is dropped
            elif "norm" in name:
                p.uniform_(0.5, 1.5)  # non-unit gains catch a norm applied to the wrong tensor
    assert config_class_instance is model.config
    return model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every byte is a token, plus <|endoftext|>, <|im_start|>, <|im_end|>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>", pad_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_source(tmp_path, arch: str, seed: int = 0, **overrides):
    """Save a tiny source as a transformers folder (safetensors + tokenizer); returns (folder, model)."""
    model = tiny_source(arch, seed, **overrides)
    folder = tmp_path / f"src-{arch}"
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return folder, model


_TOK = byte_tokenizer()


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    """Kernel tests marked `interpreter` need TRITON_INTERPRET=1 from the start of the process: without it they are
    deselected here and run in the child process that tests/test_kernels_interpreter.py starts."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    keep = [item for item in items if item.get_closest_marker("interpreter") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("interpreter") is not None])
        items[:] = keep
