import pytest
import torch

from charrnn.model import CharRNN, ModelConfig


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_stepping_one_character_at_a_time_equals_one_pass(cell):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=11, cell=cell, layers=3, hidden=24, embed=8)).eval()
    ids = torch.randint(0, 11, (4, 30))
    start = tuple(torch.randn_like(s) for s in model.init_state(4))  # a non-zero state carried in

    with torch.no_grad():
        full_logits, full_state = model(ids, start)
        state, step_logits = start, []
        for t in range(ids.shape[1]):
            logits, state = model(ids[:, t : t + 1], state)
            step_logits.append(logits)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(state, full_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_state_shapes_and_batch_independence():
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=7, layers=2, hidden=16, embed=4)).eval()
    h, c = model.init_state(3)
    assert h.shape == c.shape == (2, 3, 16)
    ids = torch.randint(0, 7, (3, 10))
    with torch.no_grad():
        batched, _ = model(ids)
        alone, _ = model(ids[1:2])
    torch.testing.assert_close(batched[1:2], alone, rtol=1e-5, atol=1e-5)


def test_gru_state_is_a_one_tuple():
    model = CharRNN(ModelConfig(vocab_size=5, cell="gru", layers=1, hidden=8, embed=4))
    state = model.init_state(2)
    assert len(state) == 1 and state[0].shape == (1, 2, 8)


@pytest.mark.parametrize(
    "kwargs", [{"cell": "transformer"}, {"layers": 0}, {"hidden": 0}, {"dropout": 1.0}, {"vocab_size": 0}]
)
def test_bad_config_is_refused(kwargs):
    settings = {"vocab_size": 5, **kwargs}
    with pytest.raises(ValueError):
        ModelConfig(**settings)


def test_state_pool_slots_are_independent_and_reused():
    from app.sessions import StatePool

    template = (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))
    pool = StatePool(template)
    slots = [pool.alloc() for _ in range(StatePool.CHUNK + 3)]  # crosses into a second chunk
    assert len(set(slots)) == len(slots) and len(pool.chunks) == 2
    states = {s: (torch.full((2, 1, 8), float(s)), torch.full((2, 1, 8), -float(s))) for s in slots[-5:]}
    for slot, state in states.items():
        pool.write(slot, state)
    for slot, state in states.items():
        assert all(torch.equal(a, b) for a, b in zip(pool.read(slot), state))
    assert pool.in_use == len(slots)
    pool.release(slots[-1])
    assert pool.in_use == len(slots) - 1
    assert pool.alloc() == slots[-1]
