"""Sampling: a pure function from logits to next characters.

The server and the offline sampler (`Engine.generate`) both call `sample_next`, so they draw characters the
same way. Every parameter is per row, and a row's draw depends only on its own logits, parameters, recent
characters and generator: the server samples a whole batch of independent requests in one call.

Before the draw, a row's logits may be changed (`adjust_logits`), in this order, as vLLM does:
- `logit_bias`: added first; a bias of -100 or less bans the character (its logit becomes -inf);
- `repetition_penalty` (vLLM/Hugging Face): a character seen in the row's recent characters has its logit
  divided by the penalty if positive, multiplied by it if not (> 1 discourages repeats, < 1 encourages them);
- `frequency_penalty` and `presence_penalty` (OpenAI): logit - frequency * count - presence * [count > 0].
The recent characters are a window, the last few the model read or wrote (`repetition_window` in the
server, 64 by default): a character model writes `e` and space all the time, and counting them over the
whole text would push them down further with every line; a window of about a line discourages loops (a
word or a line said again and again) without punishing the alphabet.

Then temperature, top_k, top_p and `min_p` (keep ids whose probability after temperature is at least min_p
times the most likely one's) cut the distribution, and one uniform number per row draws from what is left.
Temperature 0 is argmax of the adjusted logits (penalties and bias apply to greedy rows too). A row with no
bias, no penalty and no min_p draws exactly as it did before these existed.

Log-probabilities (`chosen_and_top`) are the model's own: log_softmax of the raw logits, before temperature,
penalties, bias and cuts, as vLLM returns by default.
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


U_MAX = 1 - 2**-24  # the largest fp32 below 1
BAN = -100.0  # a logit bias at or below this bans the character (OpenAI: "-100 should result in a ban")
REPETITION_WINDOW = 64  # characters the repetition penalties look back over, by default: about a line of text
# A row's bias: a dense vector (V,) or {id: bias}; its recent characters: the ids of its window.
Bias = Tensor | dict[int, float] | None
Recent = Sequence[int] | None


def _set(value) -> bool:
    """Whether a row's control is given (None and an empty bias are not; neutral values become None first)."""
    return value is not None and (len(value) > 0 if isinstance(value, dict) else True)


def adjust_logits(
    logits: Tensor,
    logit_bias: Bias | Sequence[Bias] = None,
    recent: Recent | Sequence[Recent] = None,
    repetition_penalty: Param = None,
    presence_penalty: Param = None,
    frequency_penalty: Param = None,
) -> Tensor:
    """logits (B, V) fp32 -> the logits each row samples from: its bias added, then its penalties applied over
    its `recent` ids (see the module docstring). Each argument is one value for all rows or one per row; None
    (and a repetition penalty of 1, a presence or frequency penalty of 0) leaves a row as it is.

    Returns `logits` itself when no row changes; otherwise a new tensor whose untouched rows are copies.
    Only exact elementwise arithmetic (add, multiply, divide, compare) runs on a row, so its result does not
    depend on which rows are changed beside it.
    """
    if logit_bias is None and recent is None:  # the common case: nothing to add, no window to count
        return logits
    B, V = logits.shape
    biases = list(logit_bias) if isinstance(logit_bias, Tensor) and logit_bias.dim() == 2 else _per_row(logit_bias, B)
    # one window for all rows (a sequence of ids), or one per row (a sequence of sequences or None)
    one_window = recent is None or not len(recent) or isinstance(recent[0], int)
    recents = [recent] * B if one_window else list(recent)
    reps = [None if r == 1 else r for r in _per_row(repetition_penalty, B)]
    pres = [None if p == 0 else p for p in _per_row(presence_penalty, B)]
    freqs = [None if f == 0 else f for f in _per_row(frequency_penalty, B)]
    penalized = [(_set(reps[r]) or _set(pres[r]) or _set(freqs[r])) and bool(recents[r]) for r in range(B)]
    rows = [r for r in range(B) if penalized[r] or _set(biases[r])]
    if not rows:
        return logits
    device = logits.device
    sub = logits[rows]  # (R, V), a copy
    if any(_set(biases[r]) for r in rows):
        bias = torch.zeros(len(rows), V, device=device)
        for i, r in enumerate(rows):
            b = biases[r]
            if isinstance(b, dict) and b:
                bias[i, list(b)] = torch.tensor(list(b.values()), dtype=torch.float32, device=device)
            elif isinstance(b, Tensor):
                bias[i] = b
        sub = sub + bias.masked_fill(bias <= BAN, float("-inf"))
    if any(penalized[r] for r in rows):
        # counts (R, V) of each id in each row's window: one bincount over row-offset ids
        flat = [i * V + c for i, r in enumerate(rows) if penalized[r] for c in recents[r]]
        counts = torch.bincount(torch.tensor(flat, dtype=torch.long, device=device),
                                minlength=len(rows) * V).view(len(rows), V).float()
        seen = counts > 0
        rep = torch.tensor([reps[r] if penalized[r] and reps[r] is not None else 1.0 for r in rows],
                           dtype=torch.float32, device=device)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        freq = torch.tensor([freqs[r] if penalized[r] and freqs[r] is not None else 0.0 for r in rows],
                            dtype=torch.float32, device=device)[:, None]
        pre = torch.tensor([pres[r] if penalized[r] and pres[r] is not None else 0.0 for r in rows],
                           dtype=torch.float32, device=device)[:, None]
        sub = sub - freq * counts - pre * seen.float()
    out = logits.clone()
    out[rows] = sub
    return out


def chosen_and_top(logprobs: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """logprobs (R, V) (a `torch.log_softmax` of raw logits), chosen ids (R,) -> the chosen ids' log-probabilities
    (R,), the k largest (R, k), most likely first, and their ids (R, k). Ties are ordered by id (a stable
    sort), so a row's top k do not depend on the k other rows asked for."""
    top, ids = logprobs.sort(dim=-1, descending=True, stable=True)
    return logprobs.gather(1, chosen[:, None])[:, 0], top[:, :k], ids[:, :k]


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
    *,
    min_p: Param = None,
    logit_bias: Bias | Sequence[Bias] = None,
    recent: Recent | Sequence[Recent] = None,
    repetition_penalty: Param = None,
    presence_penalty: Param = None,
    frequency_penalty: Param = None,
) -> Tensor:
    """Draw one id per row of `logits` (B, V) -> (B,).

    Each parameter is one value for all rows or a sequence with one per row, so a batch of independent
    requests is sampled in one call and each row draws only from its own generator (a seeded request gives
    the same text alone or batched). A generator is a `random.Random` (what the server uses: one draw costs
    well under a microsecond) or a `torch.Generator`.

    First the bias and penalties (`adjust_logits`, over each row's `recent` ids). Temperature 0 is then argmax.
    Otherwise the logits minus their max are divided by the temperature; top_k keeps the k most likely ids,
    top_p the smallest set whose probability reaches p, min_p the ids at least min_p times as likely as the
    most likely one (which always stays). The draw is one uniform number per row mapped through the
    cumulative distribution.
    """
    B, V = logits.shape
    temps = _per_row(temperature, B)
    ks = _per_row(top_k, B)
    ps = _per_row(top_p, B)
    ms = [None if m == 0 else m for m in _per_row(min_p, B)] if min_p is not None else [None]
    gens = _per_row(generator, B)
    logits = adjust_logits(logits.float(), logit_bias, recent, repetition_penalty, presence_penalty,
                           frequency_penalty)
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
    if any(m is not None for m in ms):
        m = torch.tensor([m if m is not None else 0.0 for m in ms], dtype=torch.float32, device=device)
        probs = probs.masked_fill(probs < m[:, None] * probs[:, :1], 0.0)
    cdf = probs.cumsum(dim=-1)
    # A u that would round to 1.0 in fp32 is kept just below it: at 1.0 the draw would land past the last id
    # with any probability, on a cut or banned character.
    u = torch.tensor([_uniform(g) for g in gens], dtype=torch.float32, device=device).clamp_(max=U_MAX)
    pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=V - 1)
    drawn = order.gather(1, pos).squeeze(1)
    if any(greedy_rows):
        drawn = torch.where(torch.tensor(greedy_rows, device=device), logits.argmax(dim=-1), drawn)
    return drawn
