"""source.gguf_architecture: the architecture read from a GGUF header without parsing the whole file."""

import struct

import numpy as np
import pytest

from kvconvert.convert.source import gguf_architecture
from kvconvert.errors import KvconvertError


def string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def header(pairs: list[bytes], version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, 0, len(pairs)) + b"".join(pairs)


def kv(key: str, kind: int, value: bytes) -> bytes:
    return string(key) + struct.pack("<I", kind) + value


# keys of every value kind before the architecture: scalars, a string, arrays of scalars, strings and arrays
BEFORE = [
    kv("a.u8", 0, struct.pack("<B", 7)),
    kv("a.f32", 6, struct.pack("<f", 1.5)),
    kv("a.u64", 10, struct.pack("<Q", 2**40)),
    kv("a.f64", 12, struct.pack("<d", 0.25)),
    kv("a.bool", 7, struct.pack("<?", True)),
    kv("a.name", 8, string("general.architecture")),  # a value equal to the key must not be taken for it
    kv("a.ints", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, -2, 3)),
    kv("a.words", 9, struct.pack("<IQ", 8, 2) + string("hello") + string("world")),
    kv("a.nested", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 2) + struct.pack("<2I", 1, 2)),
]


def test_architecture_after_every_kind_of_value(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(header(BEFORE + [kv("general.architecture", 8, string("qwen3")), kv("z", 4, b"\0" * 4)]))
    assert gguf_architecture(path) == "qwen3"


def test_agrees_with_the_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_uint32("gemma3.block_count", 2)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "def"])
    writer.add_tensor("t", np.zeros((2, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    assert gguf_architecture(path) == bytes(field.parts[field.data[0]]).decode() == "gemma3"


@pytest.mark.parametrize("cut", [6, 20, 40, -3])
def test_truncated_header(tmp_path, cut):
    full = header(BEFORE + [kv("general.architecture", 8, string("llama"))])
    path = tmp_path / "t.gguf"
    path.write_bytes(full[:cut])
    with pytest.raises(KvconvertError, match="corrupt GGUF"):
        gguf_architecture(path)


@pytest.mark.parametrize("data", [
    header([kv("x", 99, b"")]),  # an unknown value kind
    header([kv("general.architecture", 8, string("llama"))], version=1),
    header([kv("x", 4, b"\0" * 4)]),  # no architecture at all
    header([kv("general.architecture", 8, struct.pack("<Q", 2) + b"\xff\xfe")]),  # not UTF-8
])
def test_malformed_header(tmp_path, data):
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    with pytest.raises(KvconvertError, match="corrupt GGUF"):
        gguf_architecture(path)


def test_not_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(40))
    with pytest.raises(KvconvertError, match="not a GGUF"):
        gguf_architecture(path)
