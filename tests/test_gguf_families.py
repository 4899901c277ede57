"""Every supported family as a GGUF file (written by the tests: gguf_files.py): loaded as the model it holds, bit for
bit, and converted exactly (--identity)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from kvconvert.cli import app
from kvconvert.convert.source import load_source
from kvconvert.loading import load_clla

from conftest import VOCAB
from gguf_files import GGUF_ARCH, save_gguf

pytest.importorskip("gguf")
runner = CliRunner()
IDS = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(1))  # past the sliding windows of 7


@pytest.mark.parametrize("arch", list(GGUF_ARCH))
@torch.no_grad()
def test_a_gguf_loads_as_the_model_it_holds(tmp_path, arch):
    path, model = save_gguf(tmp_path, arch)
    src = load_source(path)
    assert src.model_type == ("llama" if GGUF_ARCH[arch] == "llama" else arch)
    assert torch.equal(src.model(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("arch", list(GGUF_ARCH))
@torch.no_grad()
def test_a_gguf_converts_exactly(tmp_path, arch):
    path, model = save_gguf(tmp_path, arch)
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(path), str(out), "--identity", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kv_ratio"] >= 1.0
    want, got = model(IDS).logits, load_clla(out).model(IDS).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
