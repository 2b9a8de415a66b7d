"""Sampling: a pure function from logits to next characters, and the offline generator built on it.

The server reuses `sample_next`, so the offline sampler and the service draw characters the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from charrnn.model import CharRNN, State
from charrnn.vocab import Vocab


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one id per row of `logits` (B, V) -> (B,).

    temperature 0 is argmax. Otherwise logits are shifted by their max (for stability), divided by the
    temperature, optionally cut to the `top_k` most likely ids and/or the smallest set whose probability
    reaches `top_p`, and sampled.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep each id whose preceding mass is below top_p (so the most likely id is always kept).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def start_ids(vocab: Vocab, prime: str, skip_unknown: bool = False) -> list[int]:
    """The ids that warm the state: the prime, or a newline when the prime is empty."""
    ids = vocab.encode(prime, skip_unknown=skip_unknown).tolist()
    if not ids:
        ids = [vocab.index.get("\n", 0)]
    return ids


@torch.inference_mode()
def generate(
    model: CharRNN,
    vocab: Vocab,
    prime: str = "",
    length: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    skip_unknown: bool = False,
    state: State | None = None,
) -> Iterator[str]:
    """Yield `length` characters, one at a time, continuing `prime`.

    The prime warms the state character by character, as in the post; an empty prime starts from a newline.
    """
    device = model.head.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    ids = start_ids(vocab, prime, skip_unknown)
    if state is None:
        state = model.init_state(1)
    logits = None
    for i in ids:
        logits, state = model(torch.tensor([[i]], device=device), state)
    for _ in range(length):
        next_id = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        yield vocab.chars[int(next_id)]
        logits, state = model(next_id.view(1, 1), state)
