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


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_stepper_equals_the_model(cell):
    from charrnn.model import Stepper

    torch.manual_seed(1)
    model = CharRNN(ModelConfig(vocab_size=13, cell=cell, layers=2, hidden=20, embed=6)).eval()
    stepper = Stepper(model)
    ids = torch.randint(0, 13, (3, 25))
    with torch.no_grad():
        full_logits, full_state = model(ids)
    state = model.init_state(3)
    for t in range(ids.shape[1]):
        logits, state = stepper.step(ids[:, t], state)
        torch.testing.assert_close(logits, full_logits[:, t], rtol=1e-5, atol=1e-5)
    for a, b in zip(state, full_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batched_steps_equal_per_session_steps():
    from charrnn.model import Stepper

    torch.manual_seed(2)
    model = CharRNN(ModelConfig(vocab_size=9, layers=2, hidden=16, embed=4)).eval()
    stepper = Stepper(model)
    states = [tuple(torch.randn(2, 1, 16) for _ in range(2)) for _ in range(5)]
    ids = torch.randint(0, 9, (5,))
    batched_logits, batched_state = stepper.step(ids, tuple(torch.cat(parts, dim=1) for parts in zip(*states)))
    for j, state in enumerate(states):
        logits, alone = stepper.step(ids[j : j + 1], state)
        torch.testing.assert_close(batched_logits[j : j + 1], logits, rtol=1e-6, atol=1e-6)
        for a, b in zip(alone, batched_state):
            torch.testing.assert_close(a, b[:, j : j + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_bf16_stepper_is_close_and_exactly_batch_invariant(cell):
    from charrnn.model import Stepper

    torch.manual_seed(4)
    model = CharRNN(ModelConfig(vocab_size=11, cell=cell, layers=2, hidden=32, embed=8)).eval()
    fp32, bf16 = Stepper(model), Stepper(model, precision="bf16")
    states = [tuple(torch.randn(2, 1, 32) * 0.5 for _ in range(len(model.init_state(1)))) for _ in range(6)]
    ids = torch.randint(0, 11, (6,))
    batch = tuple(torch.cat(parts, dim=1) for parts in zip(*states))
    logits16, state16 = bf16.step(ids, batch)
    logits32, _ = fp32.step(ids, batch)
    assert logits16.dtype == torch.float32 and state16[0].dtype == torch.float32
    torch.testing.assert_close(logits16, logits32, atol=0.1, rtol=0.05)
    for j, state in enumerate(states):
        alone, _ = bf16.step(ids[j : j + 1], state)
        assert torch.equal(alone, logits16[j : j + 1])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_priming_of_several_prompts_equals_priming_each_alone(cell, tmp_path):
    from app.registry import Registry
    from charrnn.checkpoint import save_model
    from charrnn.vocab import Vocab

    torch.manual_seed(5)
    vocab = Vocab.from_text("abcdefgh\n")
    model = CharRNN(ModelConfig(vocab_size=len(vocab), cell=cell, layers=2, hidden=16, embed=4))
    save_model(tmp_path / "m.safetensors", model, vocab, {})
    registry = Registry(tmp_path, precision="fp32")
    registry.scan()
    lm = registry.get("m")
    prompts = [[1, 2, 3, 4, 5], [], [7], [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1]]
    base = tuple(torch.randn(2, 1, 16) for _ in range(len(model.init_state(1))))
    starts = [None, base, base, None]
    together = lm.prime_batch(prompts, starts)
    for prompt, start, state in zip(prompts, starts, together):
        alone = lm.prime_batch([prompt], [start])[0]
        for a, b in zip(alone, state):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(together[1], base))  # an empty prompt keeps its state
    with torch.no_grad():
        _, direct = model(torch.tensor([prompts[3]]))
    torch.testing.assert_close(together[3][0], direct[0], rtol=1e-5, atol=1e-5)


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
