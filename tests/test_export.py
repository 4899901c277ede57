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


def test_auto_dtype_keeps_the_dtype_the_source_folder_declares(tmp_path):
    """transformers sets the loaded config's dtype to what it loaded in (float32): the declared one is read from
    config.json, so a bfloat16 checkpoint converts to a bfloat16 one."""
    from conftest import byte_tokenizer, tiny_source

    folder = tmp_path / "bf16-src"
    tiny_source("llama").to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert convert(folder, tmp_path / "out").exit_code == 0
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(model.parameters()).dtype == torch.bfloat16
    src, _ = save_source(tmp_path, "qwen2")  # float32
    assert convert(src, tmp_path / "f32").exit_code == 0
    assert json.loads((tmp_path / "f32" / "conversion.json").read_text())["dtype"] == "float32"


def test_a_16_bit_folder_is_widened_from_its_files_exactly(tmp_path, monkeypatch):
    """load_source reads a bfloat16 folder's tensors from its files into float32 (nothing mapped stays resident):
    the model is the one transformers loads in float32, bit for bit; a tensor whose file bytes are not the loaded
    values (here: the index points two layers at each other) is caught and widened from the loaded one instead."""
    import kvconvert.convert.source as source
    from conftest import byte_tokenizer, tiny_source

    folder = tmp_path / "bf16-src"
    tiny_source("qwen3").to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    direct = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reads = []
    read = source.read_widened
    monkeypatch.setattr(source, "read_widened", lambda *a: reads.append(a[0]) or read(*a))
    index = source.safetensors_index(folder)
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    index[a], index[b] = index[b], index[a]
    monkeypatch.setattr(source, "safetensors_index", lambda f: index)
    loaded = source.load_source(folder).model
    assert len(reads) == len(list(direct.parameters()))  # every parameter read from the files
    ids = torch.randint(0, VOCAB, (1, 20))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for (n, p), q in zip(loaded.named_parameters(), direct.parameters()):
        assert torch.equal(p, q), n
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, direct(ids).logits)
