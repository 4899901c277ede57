"""`kvconvert convert --identity`: the exported folder, bit-identical reload, atomic output."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from kvconvert.cli import app
from kvconvert.errors import KvconvertError

from conftest import ARCHS, VOCAB, save_source

runner = CliRunner()

# Reloads every folder named on its command line in one fresh process (no state of this one: the clla model type
# registered by `import kvconvert` alone) and saves each folder's logits as a tensor named by its position.
RELOAD_SCRIPT = """
import sys, torch, kvconvert
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
ids = torch.arange(40).view(2, 20) % {vocab}
logits = {{}}
for i, folder in enumerate(sys.argv[2:]):
    with torch.no_grad():
        logits[str(i)] = AutoModelForCausalLM.from_pretrained(folder)(ids).logits.contiguous()
save_file(logits, sys.argv[1])
"""


def reload_in_a_fresh_process(folders, dump) -> list[torch.Tensor]:
    """Each folder's logits on a fixed batch, computed by a new Python process."""
    from safetensors.torch import load_file

    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT.format(vocab=VOCAB), str(dump), *map(str, folders)], check=True)
    logits = load_file(dump)
    return [logits[str(i)] for i in range(len(folders))]


def convert(src, out, *extra):
    return runner.invoke(app, ["convert", str(src), str(out), "--identity", *extra])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every family's identity conversion, and the logits a fresh process computes from each exported folder (one
    process for all: starting one costs seconds). arch -> (source model, OUT, its tmp folder, reloaded logits)."""
    found = {}
    for arch in ARCHS:
        tmp = tmp_path_factory.mktemp(f"export-{arch}")
        src, src_model = save_source(tmp, arch)
        result = convert(src, tmp / "out")
        assert result.exit_code == 0, result.output
        found[arch] = (src_model, tmp / "out", tmp)
    reloaded = reload_in_a_fresh_process([found[a][1] for a in ARCHS], tmp_path_factory.mktemp("dump") / "l.safetensors")
    return {arch: (*found[arch], logits) for arch, logits in zip(ARCHS, reloaded)}


def test_export_files_and_fresh_process_reload_is_bit_identical(exported, arch):
    src_model, out, tmp_path, reloaded = exported[arch]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "conversion.json", "README.md"} <= names
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # no pickle anywhere
    assert not list(tmp_path.glob(".out.tmp-*"))
    record = json.loads((out / "conversion.json").read_text())
    # a qk-norm source's identity also caches a 16-bit key norm per layer and kv head: 1 / (2 head_dim) more
    extra = 1 / (2 * src_model.config.head_dim) if arch in ("qwen3", "gemma3_text") else 0.0
    assert record["plan"] == "identity" and record["kv_ratio"] == 1.0 + extra
    assert record["check"]["max_relative_logit_error_fp32"] <= 1e-5

    import kvconvert  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "clla"
    ids = torch.arange(40).view(2, 20) % VOCAB
    with torch.no_grad():
        here = model(ids).logits
        source_logits = src_model(ids).logits
    assert ((here - source_logits).abs().max() / source_logits.abs().max()).item() <= 1e-5
    assert torch.equal(reloaded, here)


def test_tokenizer_keeps_chat_template(tmp_path):
    from transformers import AutoTokenizer

    src, _ = save_source(tmp_path, "llama")
    out = tmp_path / "out"
    assert convert(src, out).exit_code == 0
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_existing_out_is_refused_then_replaced_with_force(tmp_path):
    src, _ = save_source(tmp_path, "qwen2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = convert(src, out)
    assert result.exit_code != 0
    assert "already exists" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = convert(src, out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from kvconvert.convert import pipeline

    src, _ = save_source(tmp_path, "mistral")
    out = tmp_path / "out"

    def broken_write(tmp, *args, **kwargs):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KvconvertError("disk full")

    monkeypatch.setattr(pipeline, "write_model", broken_write)
    result = convert(src, out)
    assert result.exit_code == 2
    assert "disk full" in result.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src-mistral"]


def test_bfloat16_export_halves_the_file(tmp_path):
    src, _ = save_source(tmp_path, "llama")
    assert convert(src, tmp_path / "f32", "--dtype", "float32").exit_code == 0
    assert convert(src, tmp_path / "bf16", "--dtype", "bfloat16").exit_code == 0
    f32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    bf16 = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert bf16 < 0.55 * f32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
