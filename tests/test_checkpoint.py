"""The checkpoint file: self-contained, no pickle, readable without torch, written atomically."""

import json
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from charrnn.checkpoint import (
    CheckpointError,
    load_model,
    model_path,
    read_header,
    save_model,
)
from charrnn.model import CharRNN, ModelConfig
from charrnn.names import validate_model_name
from charrnn.vocab import Vocab

from conftest import REPO


def make_model(vocab_size: int = 6) -> CharRNN:
    torch.manual_seed(3)
    return CharRNN(ModelConfig(vocab_size=vocab_size, layers=2, hidden=16, embed=8)).eval()


def test_save_then_load_gives_identical_logits(tmp_path):
    vocab = Vocab.from_text("abcé\n ")
    model = make_model(len(vocab))
    path = tmp_path / "m.safetensors"
    save_model(path, model, vocab, {"steps": 3})
    loaded, loaded_vocab, info = load_model(path)
    ids = torch.randint(0, len(vocab), (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert loaded_vocab == vocab
    assert info.training["steps"] == 3 and info.config["hidden"] == 16


def test_file_is_plain_safetensors_with_no_pickle(tmp_path):
    vocab = Vocab.from_text("xyz")
    path = tmp_path / "m.safetensors"
    save_model(path, make_model(3), vocab, {})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    # The file is exactly: 8-byte length, JSON header, raw tensor bytes covering the rest. Nothing else fits.
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    assert 8 + n + max(ends) == len(raw)
    assert {t["dtype"] for k, t in header.items() if k != "__metadata__"} == {"F32"}
    assert set(header["__metadata__"]) == {"format_version", "config", "vocab", "training", "start"}


def test_metadata_is_readable_without_torch(tmp_path):
    vocab = Vocab.from_text("hello\n")
    path = tmp_path / "m.safetensors"
    save_model(path, make_model(len(vocab)), vocab, {"data_file": "x.txt"})
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None\n"
        "from charrnn.checkpoint import read_metadata\n"
        f"info = read_metadata({str(path)!r})\n"
        "import json; print(json.dumps([info.vocab, info.training['data_file']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout) == [vocab.chars, "x.txt"]


def test_half_precision_weights_load_as_float32(tmp_path):
    vocab = Vocab.from_text("abcdef")
    model = make_model(len(vocab))
    path = tmp_path / "m.safetensors"
    save_model(path, model, vocab, {}, dtype="fp16")
    dtypes = {k: t["dtype"] for k, t in read_header(path).items() if k != "__metadata__"}
    assert {d for k, d in dtypes.items() if not k.startswith("start.")} == {"F16"}
    assert {d for k, d in dtypes.items() if k.startswith("start.")} == {"F32"}  # the start stays as measured
    loaded, _, info = load_model(path)
    assert loaded.head.weight.dtype == torch.float32
    assert info.training["weights_dtype"] == "fp16"
    ids = torch.randint(0, 6, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], atol=5e-3, rtol=5e-3)


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    vocab = Vocab.from_text("abc")
    path = tmp_path / "m.safetensors"
    save_model(path, make_model(3), vocab, {"steps": 1})
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save_model(path, make_model(3), vocab, {"steps": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_model(path)[2].training["steps"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_truncated_or_foreign_files_give_a_checkpoint_error(tmp_path):
    vocab = Vocab.from_text("abc")
    good = tmp_path / "good.safetensors"
    save_model(good, make_model(3), vocab, {})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    for bad in (cut, junk, tmp_path / "missing.safetensors"):
        with pytest.raises(CheckpointError):
            load_model(bad)


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", ".hidden", "x" * 65, "a..b", "name with space"])
def test_bad_model_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid model name"):
        validate_model_name(name)


def test_model_path_is_inside_the_store(tmp_path):
    assert model_path(tmp_path, "shakespeare-v2.1") == tmp_path / "shakespeare-v2.1.safetensors"


# --- whatever a file in the store holds, reading it raises CheckpointError and nothing else ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def header_file(path, header, payload: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=json_values | st.dictionaries(st.text(max_size=12), json_values, max_size=5),
       metadata=st.dictionaries(st.sampled_from(["format_version", "config", "vocab", "training", "x"]),
                                json_values | st.text(max_size=30), max_size=5))
def test_fuzzed_headers_give_a_checkpoint_error_and_nothing_else(tmp_path, header, metadata):
    for i, candidate in enumerate([header, {**(header if isinstance(header, dict) else {}),
                                            "__metadata__": metadata}]):
        path = tmp_path / f"fuzz{i}.safetensors"
        header_file(path, candidate, b"\0" * 64)
        try:
            load_model(path)
        except CheckpointError:
            pass  # the only way a bad file may fail


@pytest.mark.parametrize("header", [
    {"x": 1},
    {"x": {"data_offsets": "ab"}},
    {"x": {"data_offsets": [0, True]}},
    {"__metadata__": 5},
    {"__metadata__": {"format_version": 1}},
    {"__metadata__": {"format_version": "1", "config": "[]", "vocab": "[]"}},
    {"__metadata__": {"format_version": "1", "config": "{}", "vocab": "5"}},
    {"__metadata__": {"format_version": "1", "config": '{"vocab_size": "many"}', "vocab": '["a"]'}},
])
def test_malformed_headers_seen_in_the_wild_are_refused_plainly(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    header_file(path, header)
    with pytest.raises(CheckpointError):
        load_model(path)
