"""The inspect computation: activations equal a step-by-step run, and the unit suggestions find real signals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from charrnn.activations import interesting_units, text_features, trace
from charrnn.engine import Engine
from charrnn.model import CharRNN, ModelConfig


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_trace_equals_stepping_one_character_at_a_time(cell):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=11, cell=cell, layers=3, hidden=24, embed=8)).eval()
    ids = torch.randint(0, 11, (40,)).tolist()
    engine = Engine(model, "fp32")
    state = engine.start_state(1)
    hs, cs, probs = [], [], []
    for i in ids:
        logits, state = engine.step(torch.tensor([i]), state)
        hs.append(state[0][:, 0].clone())
        if cell == "lstm":
            cs.append(state[1][:, 0].clone())
        probs.append(torch.softmax(logits[0], -1))
    for layer in range(3):
        got = trace(engine, ids, layer, "hidden")
        assert np.array_equal(got.activations, torch.stack(hs)[:, layer].numpy())
        if cell == "lstm":
            got_c = trace(engine, ids, layer, "cell")
            assert np.array_equal(got_c.activations, torch.tanh(torch.stack(cs)[:, layer]).numpy())
    top = torch.stack(probs).topk(5, dim=-1)
    assert (got.top_ids == top.indices.numpy()).all()
    assert np.allclose(got.top_probs, top.values.numpy(), atol=1e-6)
    # and what the trained model computes, to float rounding
    with torch.no_grad():
        expected, _ = model(torch.tensor([ids]))
    assert np.allclose(got.top_probs, torch.softmax(expected[0], -1).topk(5, dim=-1).values.numpy(), atol=1e-5)


def test_trace_rejects_bad_layer_and_kind():
    engine = Engine(CharRNN(ModelConfig(vocab_size=5, cell="gru", layers=2, hidden=8, embed=4)), "fp32")
    with pytest.raises(ValueError, match="layer"):
        trace(engine, [1, 2], 2)
    with pytest.raises(ValueError, match="cell state"):
        trace(engine, [1, 2], 0, "cell")


def test_text_features_follow_lines_quotes_and_speakers():
    text = 'ROMEO:\nSay "hi" (now)\n'
    f = text_features(text)
    assert f["position in line"].tolist()[:8] == [0, 1, 2, 3, 4, 5, 6, 0]
    assert f["line ends with ':'"][:6].all() and not f["line ends with ':'"][7:].any()
    inside = "".join(c for c, q in zip(text, f["inside quotes"]) if q)
    assert inside == '"hi'  # from the opening quote up to the closing one
    assert "".join(c for c, b in zip(text, f["inside brackets"]) if b) == "(now"
    assert f["newline"].sum() == 2


def test_interesting_units_finds_a_planted_unit():
    text = ("ab cd\n" * 40)[:200]
    rng = np.random.default_rng(0)
    acts = rng.uniform(-0.1, 0.1, size=(len(text), 16)).astype(np.float32)
    acts[:, 9] = np.tanh(text_features(text)["position in line"] / 3)  # a unit that counts columns
    found = interesting_units(text, acts)
    assert found[0]["unit"] == 9 and found[0]["reason"] == "position in line" and found[0]["score"] > 0.9
    assert sum(s["reason"] == "high variance" for s in found) == 3
