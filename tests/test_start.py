"""Where a new text starts: the start metric, the candidates, the choice stored in the checkpoint, the one rule
that every new text is read from it, and the bundled model's speaker lines."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from charrnn.checkpoint import load_model, read_metadata
from charrnn.engine import Engine
from charrnn.model import CharRNN, ModelConfig
from charrnn.sampling import sample_next
from charrnn.vocab import Vocab
from training.data import DataError, load_text, split
from training.start import PASSAGE_CHARS, choose_for_checkpoint, line_starts, passages, start_loss, tune_start
from training.train import train

from conftest import REPO, SHAKESPEARE, tiny_config

SPEAKERS = ["ROMEO:", "JULIET:", "KING RICHARD III:"]


@pytest.fixture(scope="module")
def unchosen(tmp_path_factory):
    """A tiny model trained on a slice of tiny-shakespeare, its start left as trained (zero), and its text."""
    tmp = tmp_path_factory.mktemp("start")
    data = tmp / "slice.txt"
    data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    result = train(tiny_config(tmp, data, max_steps=120, eval_every=60, lr=1e-2, choose_start=False))
    model, vocab, _ = load_model(result.checkpoint)
    train_ids, val_ids = split(torch.from_numpy(vocab.encode(data.read_text(encoding="utf-8"))), 0.1)
    return result.checkpoint, model, vocab, train_ids, val_ids


def test_passages_begin_at_line_starts_and_are_drawn_the_same_each_time():
    vocab = Vocab.from_text("ab\ncd")
    rng = random.Random(0)
    text = "".join(rng.choice("abcd\n") for _ in range(5000))
    ids = torch.from_numpy(vocab.encode(text))
    rows = passages(ids, vocab, count=300)
    assert rows.shape == (300, PASSAGE_CHARS + 1)
    starts = line_starts(ids, vocab.index["\n"])
    assert all(int(p) > 0 and text[int(p) - 1] == "\n" for p in starts)
    joined = {vocab.decode(row.tolist()) for row in rows}
    assert all(any(text.startswith(passage, int(p)) for p in starts) for passage in list(joined)[:20])
    assert torch.equal(rows, passages(ids, vocab, count=300))  # seeded
    with pytest.raises(DataError, match="no newline"):
        passages(torch.from_numpy(Vocab.from_text("abc").encode("abcabc" * 50)), Vocab.from_text("abc"))


def test_start_loss_is_the_mean_loss_of_the_characters_after_the_first(unchosen):
    _, model, vocab, _, val_ids = unchosen
    texts = passages(val_ids, vocab, count=40)
    state = tuple(torch.randn(s.shape) * 0.3 for s in model.start_state(1))
    got = start_loss(model, texts, state)
    with torch.no_grad():
        losses = []
        for row in texts:
            logits, _ = model(row[None, :-1], state)
            losses.append(F.cross_entropy(logits[0], row[1:], reduction="none"))
    expected = torch.stack(losses)
    assert got.passages == 40 and len(got.by_position) == PASSAGE_CHARS
    assert got.nats == pytest.approx(expected.mean().item(), rel=1e-5)
    assert got.by_position[0] == pytest.approx(expected[:, 0].mean().item(), rel=1e-5)


def test_the_tuned_start_improves_on_where_it_began_and_leaves_the_weights(unchosen):
    _, model, vocab, train_ids, _ = unchosen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zero = model.init_state(1)
    texts = passages(train_ids, vocab, count=500, seed=5)
    tuned = tune_start(model, train_ids, vocab, zero, steps=60)
    assert start_loss(model, texts, tuned).nats < start_loss(model, texts, zero).nats - 0.01
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad for p in model.start)


def test_choosing_stores_the_best_candidate_and_keeps_the_weights(unchosen, tmp_path):
    checkpoint, model, vocab, train_ids, val_ids = unchosen
    path = tmp_path / "copy.safetensors"
    path.write_bytes(checkpoint.read_bytes())
    assert read_metadata(path).start == {"kind": "zero", "chosen": False}
    start = choose_for_checkpoint(path, train_ids, val_ids)
    found = start["candidates"]
    assert set(found) == {"zero", "newline", "two-newlines", "mean-line-start", "tuned"}
    assert start["kind"] == min(found, key=found.get) and start["loss"] == found[start["kind"]]
    assert start["loss"] < found["zero"]
    assert read_metadata(path).start == start
    stored, _, _ = load_model(path)
    weights = {k: v for k, v in stored.state_dict().items() if not k.startswith("start.")}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    texts = passages(val_ids, vocab)
    assert start_loss(stored, texts, stored.start_state(1)).nats == pytest.approx(start["loss"], abs=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(Engine(stored, "fp32").start, stored.start_state(1)))


def test_a_run_ends_by_choosing_its_start_and_logging_the_candidates(tmp_path, shakespeare_slice):
    result = train(tiny_config(tmp_path, shakespeare_slice, max_steps=10, eval_every=5))
    start = read_metadata(result.checkpoint).start
    assert start["chosen"] and start["loss"] <= start["candidates"]["zero"]
    entries = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "log.jsonl").read_text().splitlines()]
    assert [e for e in entries if e["type"] == "start"] == [{"type": "start", "step": 10, "checkpoint_step": 10, **start}]


def test_a_checkpoint_from_before_starts_loads_with_the_zero_start(unchosen, tmp_path):
    checkpoint, model, vocab, _, _ = unchosen
    tensors = {k: v for k, v in load_file(checkpoint).items() if not k.startswith("start.")}
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "start"}
    old = tmp_path / "old.safetensors"
    old.write_bytes(save(tensors, metadata=metadata))
    loaded, _, info = load_model(old)
    assert info.start == {"kind": "zero", "chosen": False}
    assert all(torch.count_nonzero(s) == 0 for s in loaded.start_state(1))
    engine = Engine(loaded, "fp32")
    rows, _ = engine.score([1, 2, 3])
    assert torch.equal(rows, engine.score([1, 2, 3], tuple(torch.zeros_like(s) for s in engine.start))[0])


def test_every_new_text_is_read_from_the_models_start():
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=6, layers=2, hidden=16, embed=4))
    model.set_start(tuple(torch.randn(2, 1, 16) for _ in range(2)))
    vocab = Vocab("\nabcde")
    engine = Engine(model, "fp32")
    zero = tuple(torch.zeros(2, 1, 16) for _ in range(2))
    ids = [1, 2, 3, 4]
    start_rows, _ = engine.score(ids)
    assert torch.equal(start_rows, engine.score(ids, engine.start)[0])
    assert not torch.equal(start_rows, engine.score(ids, zero)[0])  # the start matters, so the check can fail
    (read,), _ = engine.read([ids], [None])
    assert all(torch.equal(a, b) for a, b in zip(read, engine.read([ids], [engine.start])[0][0]))
    _, _, logits = engine.trace(ids, layer=1)
    assert torch.equal(torch.log_softmax(logits, -1), start_rows)
    # a generation: the prime read from the start, as by hand
    text = "".join(engine.generate(vocab, "abc", 20, temperature=1.0, seed=4))
    (state,), _ = engine.read([[1, 2]], [engine.start])
    rng, next_id, by_hand = random.Random(4), torch.tensor([3]), ""
    for _ in range(20):
        step_logits, state = engine.step(next_id, state)
        next_id = sample_next(step_logits, 1.0, generator=rng)
        by_hand += vocab.chars[int(next_id)]
    assert text == by_hand
    with pytest.raises(ValueError, match="a start of this model"):
        model.set_start((torch.zeros(2, 1, 16),))


def test_a_learned_start_is_trained_with_the_model_and_resumes_exactly(tmp_path, shakespeare_slice):
    straight = train(tiny_config(tmp_path / "a", shakespeare_slice, max_steps=12, eval_every=6, learn_start=0.3,
                                 choose_start=False))
    model, _, info = load_model(straight.checkpoint)
    assert info.start == {"kind": "learned", "chosen": False}
    assert all(torch.count_nonzero(s) > 0 for s in model.start)  # it moved from zeros
    half = tiny_config(tmp_path / "b", shakespeare_slice, max_steps=6, eval_every=6, learn_start=0.3,
                       choose_start=False)
    train(half)
    from training.train import config_from_resume

    resumed = train(config_from_resume(half.run_path, max_steps=12), resume_from=half.run_path)
    a, b = load_file(straight.checkpoint), load_file(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the learned start is one of the candidates when the start is chosen
    ids = torch.from_numpy(model_vocab(straight.checkpoint).encode(shakespeare_slice.read_text(encoding="utf-8")))
    start = choose_for_checkpoint(straight.checkpoint, *split(ids, 0.1))
    assert "learned" in start["candidates"]


def model_vocab(path) -> Vocab:
    return Vocab(read_metadata(path).vocab)


# --- the bundled model: a speaker's name is followed by a newline, on every path ---


@pytest.fixture(scope="module")
def bundled():
    model, vocab, info = load_model(REPO / "model_store" / "shakespeare.safetensors")
    return model, vocab, info


def test_the_bundled_model_stores_a_measured_start_better_than_zeros(bundled):
    model, vocab, info = bundled
    assert info.start["chosen"] and info.start["loss"] < info.start["candidates"]["zero"]
    corpus = load_text(SHAKESPEARE)
    _, val_ids = split(torch.from_numpy(vocab.encode(corpus.text)), 0.1)
    texts = passages(val_ids, vocab)
    stored, zero = start_loss(model, texts, model.start_state(1)), start_loss(model, texts, model.init_state(1))
    assert stored.nats == pytest.approx(info.start["loss"], abs=1e-4) and stored.nats < zero.nats - 0.1


@pytest.mark.parametrize("prime", SPEAKERS)
def test_fifty_seeded_characters_after_a_speaker_name_are_newlines(bundled, prime):
    model, vocab, _ = bundled
    engine = Engine(model)  # the server's precision (auto), as `charrnn sample` runs
    firsts = ["".join(engine.generate(vocab, prime, 1, temperature=0.8, seed=seed)) for seed in range(50)]
    assert firsts == ["\n"] * 50


def test_the_server_starts_speaker_lines_the_same_way_on_both_apis(bundled, bundled_server):
    from server import generate

    model, vocab, _ = bundled
    engine = Engine(model)
    with bundled_server.client(timeout=120) as c:
        assert c.get("/models/shakespeare").json()["start"] == read_metadata(
            REPO / "model_store" / "shakespeare.safetensors").start["kind"]
        for prime in SPEAKERS:
            for seed in range(0, 50, 7):
                native = generate(c, prime=prime, temperature=0.8, max_chars=40, seed=seed)["text"]
                r = c.post("/v1/completions", json={"model": "shakespeare", "prompt": prime, "max_tokens": 40,
                                                     "temperature": 0.8, "seed": seed})
                assert r.status_code == 200, r.text
                local = "".join(engine.generate(vocab, prime, 40, temperature=0.8, seed=seed))
                assert native == r.json()["choices"][0]["text"] == local and native[0] == "\n"
        # echo scoring reads the text from the same start
        text = "ROMEO:\nWhat light through yonder window breaks?"
        r = c.post("/v1/completions", json={"model": "shakespeare", "prompt": text, "max_tokens": 0, "echo": True,
                                             "logprobs": 0})
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
        rows, _ = engine.score([vocab.index[ch] for ch in text])
        expected = [rows[t, vocab.index[text[t + 1]]].item() for t in range(len(text) - 1)]
        assert served == pytest.approx(expected, abs=1e-6)
