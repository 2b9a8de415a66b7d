"""Sampling: a pure function from logits to next characters.

The server and the offline sampler (`Engine.generate`) both call `sample_next`, so they draw characters the
same way.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor


Param = float | int | None | Sequence[float | int | None]
# A row's random source: Python's Mersenne Twister (cheap per draw, seedable) or a torch generator.
Rng = random.Random | torch.Generator | None


def _per_row(value, rows: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def _uniform(rng: Rng) -> float:
    if isinstance(rng, random.Random):
        return rng.random()
    return torch.rand(1, generator=rng).item()


def sample_next(
    logits: Tensor,
    temperature: Param = 1.0,
    top_k: Param = None,
    top_p: Param = None,
    generator: Rng | Sequence[Rng] = None,
) -> Tensor:
    """Draw one id per row of `logits` (B, V) -> (B,).

    Each of temperature, top_k, top_p and generator is one value for all rows or a sequence with one per row,
    so a batch of independent requests is sampled in one call and each row draws only from its own generator
    (a seeded request gives the same text alone or batched). A generator is a `random.Random` (what the
    server uses: one draw costs well under a microsecond) or a `torch.Generator`.

    Temperature 0 is argmax. Otherwise the logits minus their max are divided by the temperature; top_k keeps the
    k most likely ids, top_p the smallest set whose probability reaches p (the most likely id always stays).
    The draw is one uniform number per row mapped through the cumulative distribution.
    """
    B, V = logits.shape
    temps = _per_row(temperature, B)
    ks = _per_row(top_k, B)
    ps = _per_row(top_p, B)
    gens = _per_row(generator, B)
    logits = logits.float()
    greedy_rows = [t == 0 for t in temps]
    if all(greedy_rows):
        return logits.argmax(dim=-1)
    device = logits.device
    t = torch.tensor([t if t > 0 else 1.0 for t in temps], dtype=torch.float32, device=device)
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / t[:, None], dim=-1)
    # Always in order of likelihood, whether or not this row cuts: a row's draw must not depend on the
    # parameters of the other rows in its batch.
    probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=device)
    if any(k is not None for k in ks):
        k = torch.tensor([k if k is not None else V for k in ks], device=device)
        probs = probs.masked_fill(rank[None, :] >= k[:, None], 0.0)
    if any(p is not None for p in ps):
        p = torch.tensor([p if p is not None else 2.0 for p in ps], dtype=torch.float32, device=device)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill((mass_before >= p[:, None]) & (rank[None, :] > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    u = torch.tensor([_uniform(g) for g in gens], dtype=torch.float32, device=device)
    pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=V - 1)
    drawn = order.gather(1, pos).squeeze(1)
    if any(greedy_rows):
        drawn = torch.where(torch.tensor(greedy_rows, device=device), logits.argmax(dim=-1), drawn)
    return drawn
