"""AWD-LSTM's regularisers and the cosine schedule: training-only, exact where they are off, served unchanged."""

import json
import math

import pytest
import torch

from charrnn.checkpoint import load_model
from charrnn.engine import Engine
from charrnn.model import CharRNN, ModelConfig
from training.train import COSINE_FLOOR, learning_rate, make_optimizer, train

from conftest import tiny_config


def pair(cell: str, **regularisers) -> tuple[CharRNN, CharRNN]:
    """A plain model and one with the same weights and the given regularisers, both in training mode."""
    torch.manual_seed(0)
    plain = CharRNN(ModelConfig(vocab_size=13, cell=cell, layers=3, hidden=24, embed=8)).train()
    other = CharRNN(ModelConfig(vocab_size=13, cell=cell, layers=3, hidden=24, embed=8, **regularisers)).train()
    other.load_state_dict(plain.state_dict())
    return plain, other


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_layer_by_layer_equals_the_fused_stack_when_nothing_is_dropped(cell):
    # weight_drop this small keeps every weight: the per-layer path must compute what nn.LSTM computes
    plain, other = pair(cell, weight_drop=1e-9)
    assert other.config.per_layer
    ids = torch.randint(0, 13, (4, 20))
    start = tuple(torch.randn_like(s) for s in plain.init_state(4))
    (a, sa), (b, sb) = plain(ids, start), other(ids, start)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for x, y in zip(sa, sb):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    b.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in other.rnn.parameters())


@pytest.mark.parametrize("regularisers", [{"weight_drop": 0.5}, {"embed_drop": 0.5},
                                          {"dropout": 0.5, "locked_dropout": True}])
def test_regularisers_change_training_and_nothing_else(regularisers):
    plain, other = pair("lstm", **regularisers)
    ids = torch.randint(0, 13, (4, 20))
    assert not torch.allclose(plain(ids)[0], other(ids)[0])  # active in training
    plain.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids)[0], other(ids)[0], rtol=0, atol=0)  # gone in eval mode
    assert other.state_dict().keys() == plain.state_dict().keys()  # the checkpoint holds the same tensors


def test_weight_drop_drops_the_recurrent_weights_only(monkeypatch):
    _, model = pair("lstm", weight_drop=0.5)
    dropped: list[tuple[int, ...]] = []
    real = torch.nn.functional.dropout

    def watch(x, p=0.5, training=True, inplace=False):
        if p > 0:  # the stack's own dropout is 0 here
            dropped.append(tuple(x.shape))
        return real(x, p, training, inplace)

    monkeypatch.setattr(torch.nn.functional, "dropout", watch)
    model(torch.randint(0, 13, (2, 5)))
    assert dropped == [(4 * 24, 24)] * 3  # one weight_hh per layer, nothing else


def test_locked_dropout_keeps_one_mask_per_sequence_for_all_steps():
    _, model = pair("lstm", dropout=0.5, locked_dropout=True)
    out = model._dropout(torch.ones(6, 40, 10))
    assert torch.equal(out, out[:, :1].expand_as(out))  # every step of a sequence has the same mask
    assert set(out.unique().tolist()) == {0.0, 2.0}  # kept units are scaled by 1 / (1 - p)
    assert not torch.equal(out[0], out[1])  # sequences differ (probability of equal masks: 2^-10)


def test_embedding_drop_zeroes_whole_characters():
    _, model = pair("lstm", embed_drop=0.5)
    ids = torch.arange(13).repeat(3, 2)  # every character, several times
    x = model._embed(ids)
    zero = (x == 0).all(dim=-1)
    for char in range(13):  # a character is dropped everywhere or nowhere in the batch
        assert zero[ids == char].all() or not zero[ids == char].any()
    assert 0 < zero.float().mean() < 1
    kept = ~zero
    torch.testing.assert_close(x[kept], 2 * model.embedding(ids)[kept])


def test_cosine_schedule_warms_up_then_falls_to_the_floor(tmp_path, shakespeare_slice):
    cfg = tiny_config(tmp_path, shakespeare_slice, schedule="cosine", warmup_steps=4, lr=1e-2)
    assert [learning_rate(cfg, 0, s, 0.0) for s in range(4)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert learning_rate(cfg, 0, 10, 0.0) == pytest.approx(1e-2)
    assert learning_rate(cfg, 0, 10, 0.5) == pytest.approx(1e-2 * (1 + COSINE_FLOOR) / 2)
    assert learning_rate(cfg, 0, 10, 1.0) == learning_rate(cfg, 0, 10, 2.0) == pytest.approx(1e-2 * COSINE_FLOOR)
    decay = tiny_config(tmp_path, shakespeare_slice, lr=1e-2, lr_decay=0.5, decay_after=1.0)
    assert learning_rate(decay, 3.0) == pytest.approx(1e-2 * 0.25)  # char-rnn's, unchanged


def test_weight_decay_uses_adamw(tmp_path, shakespeare_slice):
    model = CharRNN(ModelConfig(vocab_size=5, layers=1, hidden=8, embed=4))
    assert type(make_optimizer(tiny_config(tmp_path, shakespeare_slice, weight_decay=0.1), model)) is torch.optim.AdamW
    assert type(make_optimizer(tiny_config(tmp_path, shakespeare_slice), model)) is torch.optim.Adam


def test_a_regularised_run_trains_serves_and_records_its_options(tmp_path, shakespeare_slice):
    options = dict(weight_drop=0.3, embed_drop=0.1, locked_dropout=True, weight_decay=0.1, schedule="cosine",
                   warmup_steps=3, max_steps=12, eval_every=6, lr=1e-2)
    result = train(tiny_config(tmp_path, shakespeare_slice, **options))
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    lrs = [e["lr"] for e in log if e["type"] == "train"]
    assert lrs[0] == pytest.approx(1e-2 * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * 9 / 12))))
    model, vocab, info = load_model(result.checkpoint)
    assert {k: info.training["train_config"][k] for k in options} == options
    assert model.config.weight_drop == 0.3 and not model.training
    # the engine serves the stored weights as they are: no mask anywhere
    ids = torch.as_tensor(vocab.encode("ROMEO:"), dtype=torch.long)[None]
    with torch.no_grad():
        expected = model(ids)[0][0, -1]
    engine = Engine(model, precision="fp32")
    state = engine.start_state(1)
    for i in ids[0]:
        logits, state = engine.step(torch.tensor([int(i)]), state)
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)
