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


def test_a_gguf_is_parsed_once_per_load(tmp_path, monkeypatch):
    """transformers reads the file for the config, the weights and the tokenizer: one parse serves all three, and
    gguf's own names are back once the load is done."""
    import gguf

    path, model = save_gguf(tmp_path, "llama")
    made, original = [], gguf.GGUFReader

    def counting(*args, **kwargs):
        made.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    name_map = gguf.get_tensor_name_map
    src = load_source(path)
    assert len(made) == 1
    assert gguf.GGUFReader is counting and gguf.get_tensor_name_map is name_map
    with torch.no_grad():
        assert torch.equal(src.model(IDS).logits, model(IDS).logits)
    load_source(path)
    assert len(made) == 2  # nothing kept between loads
