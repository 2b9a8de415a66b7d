import numpy as np
import pytest

from charrnn.vocab import UnknownCharactersError, Vocab


def test_vocab_is_sorted_unicode_characters_not_bytes():
    text = "héllo wörld 你好\n"
    vocab = Vocab.from_text(text)
    assert vocab.chars == sorted(set(text))
    assert "你" in vocab and "é" in vocab
    assert len(vocab) == len(set(text))  # code points, so é is one entry, not two bytes


def test_encode_decode_round_trip_with_unicode():
    text = "Ça va? 東京 naïve — ok\r\n\ttab"
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    assert ids.dtype == np.uint8
    assert vocab.decode(ids) == text


def test_large_vocabularies_use_wider_ids():
    chars = [chr(0x4E00 + i) for i in range(300)]
    vocab = Vocab(chars)
    ids = vocab.encode("".join(reversed(chars)))
    assert ids.dtype == np.int16
    assert ids[0] == 299 and ids[-1] == 0


def test_unknown_characters_are_named():
    vocab = Vocab.from_text("abc")
    with pytest.raises(UnknownCharactersError) as err:
        vocab.encode("abxyzx")
    assert err.value.chars == ["x", "y", "z"]
    assert "'x' (U+0078)" in str(err.value)
    assert vocab.decode(vocab.encode("abxc", skip_unknown=True)) == "abc"


def test_unsorted_vocabulary_is_refused():
    with pytest.raises(ValueError):
        Vocab(["b", "a"])
