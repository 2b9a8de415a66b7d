"""Loading, splitting and batching training text, and the plain errors for unusable files."""

import pytest
import torch

from charrnn.vocab import Vocab
from training.data import Batches, DataError, encode_corpus, load_text, split, val_batches


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_text(tmp_path / "nope.txt")


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_text(tmp_path / "empty.txt")


def test_binary_file(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="binary"):
        load_text(tmp_path / "blob.bin")


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"not valid UTF-8 \(bad byte 0xe9 at offset 3\)"):
        load_text(tmp_path / "latin1.txt")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="not a regular file"):
        load_text(tmp_path)


def test_utf8_text_and_its_hash(tmp_path):
    (tmp_path / "ok.txt").write_text("\ufeffhello 世界", encoding="utf-8")
    corpus = load_text(tmp_path / "ok.txt")
    assert corpus.text == "hello 世界"  # the BOM is dropped
    assert len(corpus.sha256) == 64


def test_split_is_first_90_percent_then_last_10():
    ids = torch.arange(1000)
    train, val = split(ids, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert train[-1] == 899 and val[0] == 900
    with pytest.raises(DataError):
        split(ids, 1.5)


def test_ids_are_a_compact_tensor():
    text = "abc" * 1000
    ids = encode_corpus(text, Vocab.from_text(text))
    assert ids.dtype == torch.uint8 and ids.shape == (3000,)


def test_batches_are_contiguous_streams_for_tbptt():
    ids = torch.arange(1001)
    batches = Batches(ids, batch_size=4, seq_len=10)
    stream_len = 1000 // 4
    assert len(batches) == stream_len // 10
    x0, y0 = batches.get(0)
    x1, _ = batches.get(1)
    assert x0.shape == (4, 10) and x0.dtype == torch.int64
    # targets are inputs shifted by one character
    assert torch.equal(y0[:, :-1], x0[:, 1:])
    # row b of step 1 continues row b of step 0, so carrying the hidden state is meaningful
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)
    # each row is its own region of the text
    assert x0[:, 0].tolist() == [0, stream_len, 2 * stream_len, 3 * stream_len]


def test_text_too_short_for_one_batch():
    with pytest.raises(DataError, match="too short for one batch of --batch-size 64 x --seq-len 128"):
        Batches(torch.arange(500), batch_size=64, seq_len=128)


def test_validation_streams_adapt_to_a_short_validation_text():
    val = val_batches(torch.arange(50), batch_size=64, seq_len=128)
    x, y = val.get(0)
    assert len(val) >= 1 and x.shape[1] <= 49
