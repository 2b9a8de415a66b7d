"""The inference engine computes what the trained model computes, and stepping equals reading."""

from __future__ import annotations

import random

import pytest
import torch

from charrnn.engine import Engine, resolve_precision, start_ids
from charrnn.model import CharRNN, ModelConfig
from charrnn.vocab import Vocab

CELLS = ["lstm", "gru", "rnn"]


def model_of(cell: str, hidden: int = 24, layers: int = 3, vocab: int = 11, seed: int = 0) -> CharRNN:
    torch.manual_seed(seed)
    return CharRNN(ModelConfig(vocab_size=vocab, cell=cell, layers=layers, hidden=hidden, embed=8, dropout=0.3))


def random_state(model: CharRNN, batch: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn_like(s) * 0.5 for s in model.init_state(batch))


@pytest.mark.parametrize("cell", CELLS)
def test_steps_equal_the_trained_model_in_fp32_and_come_close_in_bf16(cell):
    model = model_of(cell)
    ids = torch.randint(0, 11, (4, 30))
    start = random_state(model, 4)
    with torch.no_grad():
        full_logits, full_state = model.eval()(ids, start)
    for precision, tolerance in (("fp32", 1e-5), ("bf16", 0.05)):
        engine = Engine(model, precision)
        state, logits = start, []
        for t in range(ids.shape[1]):
            step_logits, state = engine.step(ids[:, t], state)
            logits.append(step_logits)
        torch.testing.assert_close(torch.stack(logits, 1), full_logits, rtol=tolerance, atol=tolerance)
        for a, b in zip(state, full_state):
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reading_a_prompt_equals_stepping_it_bit_for_bit(cell, precision):
    model = model_of(cell, hidden=40)
    engine = Engine(model, precision)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [], [9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2]]
    starts = [None, random_state(model, 1), random_state(model, 1), random_state(model, 1)]
    read, _ = engine.read(prompts, starts)
    for prompt, start, got in zip(prompts, starts, read):
        state = start if start is not None else engine.start_state(1)
        for i in prompt:
            _, state = engine.step(torch.tensor([i]), state)
        assert all(torch.equal(a, b) for a, b in zip(state, got))
    assert all(torch.equal(a, b) for a, b in zip(read[1], starts[1]))  # an empty prompt keeps its state


@pytest.mark.parametrize("cell", CELLS)
def test_building_an_engine_leaves_the_model_as_it_was(cell):
    model = model_of(cell)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Engine(model, "fp32")
    Engine(model, "bf16")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_mode_does_not_reach_inference():
    model = model_of("lstm").train()  # dropout 0.3, as during training
    engine = Engine(model, "fp32")
    state = engine.start_state(1)
    a, _ = engine.step(torch.tensor([3]), state)
    b, _ = engine.step(torch.tensor([3]), state)
    assert torch.equal(a, b) and model.training  # no dropout, and the model's mode is left alone
    with torch.no_grad():
        expected, _ = model.eval()(torch.tensor([[3]]))
    torch.testing.assert_close(a, expected[:, 0], rtol=1e-5, atol=1e-5)


def test_trace_returns_every_character_of_a_layer():
    model = model_of("lstm", hidden=16, layers=2)
    engine = Engine(model, "fp32")
    ids = [1, 5, 2, 7, 7, 0]
    h, c, logits = engine.trace(ids, layer=0)
    assert h.shape == c.shape == (6, 16) and logits.shape == (6, 11)
    state = engine.start_state(1)
    for t, i in enumerate(ids):
        step_logits, state = engine.step(torch.tensor([i]), state)
        assert torch.equal(state[0][0, 0], h[t]) and torch.equal(state[1][0, 0], c[t])
        assert torch.equal(step_logits[0], logits[t])
    with pytest.raises(ValueError, match="nothing to trace"):
        engine.trace([], 0)


def test_the_empty_prime_rule_lives_in_one_place():
    vocab = Vocab.from_text("ab\ncd")
    assert start_ids(vocab, []) == [vocab.index["\n"]]
    assert start_ids(vocab, [2, 3]) == [2, 3]
    assert start_ids(Vocab.from_text("xyz"), []) == [0]  # no newline in the vocabulary: the first character


def test_generate_is_seeded_and_reads_the_prime():
    vocab = Vocab.from_text("abcdefghij\n")
    engine = Engine(model_of("lstm", vocab=len(vocab)), "fp32")
    a = "".join(engine.generate(vocab, "abc", 50, temperature=1.0, seed=3))
    b = "".join(engine.generate(vocab, "abc", 50, temperature=1.0, seed=3))
    assert a == b and len(a) == 50
    # the same draws by hand: read all but the last prime character, then step and sample
    (state,), _ = engine.read([[vocab.index[ch] for ch in "ab"]], [None])
    rng, next_id, text = random.Random(3), torch.tensor([vocab.index["c"]]), ""
    from charrnn.sampling import sample_next

    for _ in range(50):
        logits, state = engine.step(next_id, state)
        next_id = sample_next(logits, 1.0, generator=rng)
        text += vocab.chars[int(next_id)]
    assert text == a


def test_precision_names():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_score_equals_the_log_softmax_of_stepping_one_by_one(cell, precision):
    model = model_of(cell, hidden=40)
    engine = Engine(model, precision)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    for start in (None, random_state(model, 1)):
        rows, final = engine.score(ids, start)
        assert rows.shape == (len(ids), 11)
        state = start if start is not None else engine.start_state(1)
        for t, i in enumerate(ids):
            logits, state = engine.step(torch.tensor([i]), state)
            assert torch.equal(rows[t], torch.log_softmax(logits.float(), -1)[0]), f"position {t}"
        assert all(torch.equal(a, b) for a, b in zip(state, final))
    rows, final = engine.score([], start)
    assert rows.shape == (0, 11) and final is start
