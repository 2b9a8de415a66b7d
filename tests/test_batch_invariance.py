"""Batch invariance as a property: a row's result never depends on the rows around it.

For every batch size from 1 to 64 and a spread up to 256, with random states, random inputs and the row at
random positions, each row's logits, state and sampled character equal those of the row stepped alone, bit
for bit, for every precision the server may choose on this machine and at the thread counts it uses; so do
its character and log-probabilities when rows carry random biases, penalties over random windows, min_p and
logprobs, as the decoder passes them.
Reading primes is held to the same standard with hypothesis: any prompts, read together or alone, in one
piece or cut anywhere, from any state.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.settings import Settings
from charrnn.checkpoint import load_model
from charrnn.engine import Engine, resolve_precision
from charrnn.model import CharRNN, ModelConfig
from charrnn.sampling import chosen_and_top, sample_next
from conftest import REPO

# fp32 can always be chosen (CHARRNN_DECODE_PRECISION=fp32); bf16 where the CPU has bf16 units ("auto").
PRECISIONS = sorted({"fp32", resolve_precision("auto")})
# What the server runs with here (derived from the CPUs it may use), and two threads as on a bigger machine.
THREADS = sorted({Settings().decode_threads(), 2})
SIZES = list(range(1, 65)) + [80, 100, 128, 160, 200, 256]


@pytest.fixture(scope="module")
def bundled() -> CharRNN:
    model, _, _ = load_model(REPO / "model_store" / "shakespeare.safetensors")
    return model


def small_models() -> dict[str, CharRNN]:
    """Other cells, with hidden sizes that leave remainders past whole vector registers."""
    torch.manual_seed(0)
    return {f"{cell}-{hidden}": CharRNN(ModelConfig(vocab_size=30, cell=cell, layers=2, hidden=hidden, embed=12))
            for cell, hidden in (("gru", 100), ("rnn", 48), ("lstm", 36))}


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def random_batch(engine: Engine, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    L, H, V = engine.config.layers, engine.config.hidden, engine.head.weight.shape[0]
    ids = torch.randint(0, V, (batch,), generator=gen)
    h = torch.rand(L, batch, H, generator=gen) * 2 - 1  # h lies in (-1, 1)
    state = (h, torch.randn(L, batch, H, generator=gen) * 3)[: engine.state_size]
    return ids, state


def check_every_size(engine: Engine, sizes: list[int], rows_per_size: int = 3) -> None:
    gen = torch.Generator().manual_seed(1234)
    pick = random.Random(99)
    for B in sizes:
        ids, state = random_batch(engine, B, gen)
        logits, new_state = engine.step(ids, state)
        # per-row sampling settings and generators, as the decoder passes them
        temps = [pick.choice([0.0, 0.5, 1.0, 1.7]) for _ in range(B)]
        top_ks = [pick.choice([None, 1, 5, 40]) for _ in range(B)]
        top_ps = [pick.choice([None, 0.5, 0.9]) for _ in range(B)]
        seeds = [pick.randrange(1 << 30) for _ in range(B)]
        chosen = sample_next(logits, temps, top_ks, top_ps, [random.Random(s) for s in seeds]).tolist()
        for r in {0, B - 1, *(pick.randrange(B) for _ in range(rows_per_size - 2))}:
            alone_logits, alone_state = engine.step(ids[r : r + 1], tuple(t[:, r : r + 1].clone() for t in state))
            where = f"row {r} of a batch of {B} ({engine.precision}, {torch.get_num_threads()} threads)"
            assert torch.equal(alone_logits[0], logits[r]), f"logits differ: {where}"
            for a, b in zip(alone_state, new_state):
                assert torch.equal(a[:, 0], b[:, r]), f"state differs: {where}"
            alone_char = sample_next(alone_logits, temps[r], top_ks[r], top_ps[r], random.Random(seeds[r]))
            assert int(alone_char) == chosen[r], f"sampled character differs: {where}"
        check_controls(logits, engine, ids, state, temps, top_ks, top_ps, seeds, pick)


def random_controls(pick: random.Random, V: int) -> dict:
    """One row's bias, penalties (over a random window), min_p and logprobs; each often off."""
    window = [pick.randrange(V) for _ in range(pick.choice([0, 1, 5, 64]))]
    bias = pick.choice([None, {pick.randrange(V): pick.choice([-100.0, -2.5, 3.0]) for _ in range(3)},
                        torch.randn(V, generator=torch.Generator().manual_seed(pick.randrange(1 << 30)))])
    return dict(min_p=pick.choice([None, 0.0, 0.05, 0.3]), logit_bias=bias,
                recent=pick.choice([None, window]), repetition_penalty=pick.choice([1.0, 0.8, 1.3]),
                presence_penalty=pick.choice([0.0, -0.5, 1.5]), frequency_penalty=pick.choice([0.0, 0.2, -1.0]),
                logprobs=pick.choice([None, 0, 1, 5]))


def check_controls(logits, engine, ids, state, temps, top_ks, top_ps, seeds, pick) -> None:
    """The same step's rows sampled with random per-row controls: alone as in the batch, logprobs exact."""
    B, V = logits.shape
    rows = [random_controls(pick, V) for _ in range(B)]
    sampling = {k: [row[k] for row in rows] for k in rows[0] if k != "logprobs"}
    chosen = sample_next(logits, temps, top_ks, top_ps, [random.Random(s) for s in seeds], **sampling)
    asking = [r for r in range(B) if rows[r]["logprobs"] is not None]
    if asking:  # as the decoder does: only the rows that asked, the largest k of them
        index = torch.tensor(asking)
        k = max(rows[r]["logprobs"] for r in asking)
        lps = chosen_and_top(torch.log_softmax(logits[index], dim=-1), chosen[index], k)
    for r in {0, B - 1, pick.randrange(B)}:
        alone_logits, _ = engine.step(ids[r : r + 1], tuple(t[:, r : r + 1].clone() for t in state))
        where = f"row {r} of a batch of {B} with controls ({engine.precision}, {torch.get_num_threads()} threads)"
        mine = {k: v[r] for k, v in sampling.items()}
        alone = sample_next(alone_logits, temps[r], top_ks[r], top_ps[r], random.Random(seeds[r]), **mine)
        assert int(alone) == int(chosen[r]), f"sampled character differs: {where}"
        if rows[r]["logprobs"] is not None:
            n = rows[r]["logprobs"]
            exact = torch.log_softmax(alone_logits.float(), -1)[0]  # the model's own distribution
            at = asking.index(r)
            assert lps[0][at] == exact[int(alone)], f"logprob differs: {where}"
            top, top_ids = exact.sort(descending=True, stable=True)
            assert torch.equal(lps[1][at, :n], top[:n]) and torch.equal(lps[2][at, :n], top_ids[:n]), where


@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_bundled_model_step_is_batch_invariant_at_every_size(bundled, precision, threads):
    check_every_size(Engine(bundled, precision), SIZES)


@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_other_cells_and_sizes_are_batch_invariant(precision, threads):
    for model in small_models().values():
        check_every_size(Engine(model, precision), SIZES, rows_per_size=2)


prompts = st.lists(st.lists(st.integers(0, 64), max_size=40), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=prompts, cuts=st.lists(st.integers(1, 39), max_size=4), seed=st.integers(0, 2**31 - 1),
       precision=st.sampled_from(PRECISIONS))
def test_a_prime_reads_the_same_alone_together_and_in_pieces(bundled, prompts, cuts, seed, precision):
    engine = engine_for(bundled, precision)
    gen = torch.Generator().manual_seed(seed)
    starts = [None if i % 2 else random_batch(engine, 1, gen)[1] for i in range(len(prompts))]
    together, _ = engine.read(prompts, starts)
    for prompt, start, state in zip(prompts, starts, together):
        alone, _ = engine.read([prompt], [start])
        # the same prompt cut into pieces, each read from the state the last one left
        pieces, last = [], 0
        for cut in sorted(set(c for c in cuts if c < len(prompt))) + [len(prompt)]:
            pieces.append(prompt[last:cut])
            last = cut
        sliced = start
        for piece in pieces:
            (sliced,), _ = engine.read([piece], [sliced])
        for a, b, c in zip(state, alone[0], sliced):
            assert torch.equal(a, b) and torch.equal(a, c)
    # and reading equals stepping: the last prompt, one character at a time
    state = starts[-1] if starts[-1] is not None else engine.start_state(1)
    for i in prompts[-1]:
        _, state = engine.step(torch.tensor([i]), state)
    assert all(torch.equal(a, b) for a, b in zip(state, together[-1]))


_engines: dict[tuple[int, str], Engine] = {}


def engine_for(model: CharRNN, precision: str) -> Engine:
    """One engine per model and precision across hypothesis examples (packing the weights takes a moment)."""
    key = (id(model), precision)
    if key not in _engines:
        _engines[key] = Engine(model, precision)
    return _engines[key]


# --- the same promise at the server: the reproduction from the issue, with the bundled model ---

QUEEN = {"prime": "QUEEN:", "temperature": 0.9, "max_chars": 300, "seed": 1234}


def crowd(i: int, **overrides) -> dict:
    return {"prime": "A" * (i % 5 + 1), "temperature": 1.0, "max_chars": 300, "seed": i, **overrides}


async def stream_text(client, body: dict) -> str:
    from httpx_sse import aconnect_sse

    chars = []
    async with aconnect_sse(client, "POST", "/generate", json=body) as source:
        assert source.response.status_code == 200
        async for event in source.aiter_sse():
            if event.event == "token":
                chars.append(json.loads(event.data)["char"])
            assert event.event != "error", event.data
    return "".join(chars)


async def together(url: str, bodies: list[dict]) -> list[str]:
    """Start every stream at once; their texts in order."""
    import asyncio

    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(stream_text(client, body) for body in bodies))


def solo(server, body: dict) -> str:
    from server import generate

    with server.client(timeout=120) as c:
        return generate(c, **body)["text"]


def test_seeded_stream_gives_the_same_text_alone_and_among_15_others_20_times_in_20(bundled_server):
    import asyncio

    alone = solo(bundled_server, QUEEN)
    assert len(alone) == 300
    for repetition in range(20):
        texts = asyncio.run(together(bundled_server.url, [QUEEN] + [crowd(i) for i in range(15)]))
        assert texts[0] == alone, f"repetition {repetition}: differs at character " \
            f"{next(i for i, (a, b) in enumerate(zip(texts[0], alone)) if a != b)}"
    assert bundled_server.metric("charrnn_decode_batch_size_sum") > bundled_server.metric(
        "charrnn_decode_batch_size_count") * 4  # the streams really were stepped together


def test_seeded_stream_is_unchanged_while_the_batch_shrinks_through_every_size(bundled_server):
    import asyncio

    alone = solo(bundled_server, QUEEN)
    # the others end one by one (after 18, 36, ... 270 characters): the batch passes through 16, 15, ... 1
    others = [crowd(i, max_chars=18 * (i + 1)) for i in range(15)]
    texts = asyncio.run(together(bundled_server.url, [QUEEN] + others))
    assert texts[0] == alone
    assert [len(t) for t in texts[1:]] == [18 * (i + 1) for i in range(15)]
    for body, text in zip(others[:3], texts[1:4]):  # the leavers got their own solo texts too
        assert text == solo(bundled_server, body)


def test_seeded_text_is_unchanged_beside_long_primes_and_a_long_prime_reads_the_same(bundled_server):
    import asyncio

    import httpx

    long_prime = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:4000]
    long_body = {"prime": long_prime, "temperature": 1.0, "max_chars": 80, "seed": 7}
    alone, long_alone = solo(bundled_server, QUEEN), solo(bundled_server, long_body)

    async def scenario() -> tuple[list[str], str]:
        async with httpx.AsyncClient(base_url=bundled_server.url, timeout=120) as client:
            async def flood() -> None:  # long primes back to back, as the reproduction
                for _ in range(3):
                    r = await client.post("/generate", json={"prime": long_prime, "max_chars": 1, "stream": False})
                    assert r.status_code == 200

            streams = asyncio.gather(*(stream_text(client, b) for b in [QUEEN, long_body, crowd(1), crowd(2)]))
            texts, _ = await asyncio.gather(streams, flood())
            return texts

    texts = asyncio.run(scenario())
    assert texts[0] == alone and texts[1] == long_alone
