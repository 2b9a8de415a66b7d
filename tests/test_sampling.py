import torch

from charrnn.sampling import adjust_logits, chosen_and_top, sample_next


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]


def test_same_seed_same_draws_and_different_seed_differs():
    logits = torch.zeros(1, 50)
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (1, 1, 2))
    a = [int(sample_next(logits, 1.0, generator=g1)) for _ in range(20)]
    b = [int(sample_next(logits, 1.0, generator=g2)) for _ in range(20)]
    c = [int(sample_next(logits, 1.0, generator=g3)) for _ in range(20)]
    assert a == b and a != c


def test_top_k_only_draws_the_k_most_likely():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 2.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {3, 4}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(probs.log(), 1.0, top_p=0.75, generator=g)) for _ in range(300)}
    assert draws == {0, 1}


def test_low_temperature_sharpens():
    logits = torch.tensor([[0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    hot = sum(int(sample_next(logits, 5.0, generator=g)) for _ in range(500))
    cold = sum(int(sample_next(logits, 0.2, generator=g)) for _ in range(500))
    assert cold > 480 and 200 < hot < 350


def test_per_row_parameters_and_generators_match_rows_sampled_alone():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    temps, ks, ps = [0.0, 0.7, 1.3, 1.0], [None, 5, None, 3], [None, None, 0.9, None]
    batched_gens = [torch.Generator().manual_seed(s) for s in range(4)]
    alone_gens = [torch.Generator().manual_seed(s) for s in range(4)]
    for _ in range(50):
        batched = sample_next(logits, temps, ks, ps, batched_gens)
        alone = [int(sample_next(logits[i : i + 1], temps[i], ks[i], ps[i], alone_gens[i])) for i in range(4)]
        assert batched.tolist() == alone
    assert batched[0] == logits[0].argmax()


def test_draws_follow_the_distribution():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    g = torch.Generator().manual_seed(1)
    draws = [int(sample_next(probs.log(), 1.0, generator=g)) for _ in range(3000)]
    shares = [draws.count(i) / 3000 for i in range(3)]
    assert abs(shares[0] - 0.6) < 0.03 and abs(shares[1] - 0.3) < 0.03 and abs(shares[2] - 0.1) < 0.02


def test_a_rows_draw_does_not_depend_on_the_other_rows_parameters():
    import random

    torch.manual_seed(3)
    logits = torch.randn(3, 40)
    for seed in range(30):
        alone = int(sample_next(logits[:1], 1.0, generator=random.Random(seed)))
        mixed = sample_next(logits, [1.0, 0.5, 0.0], [None, 3, None], [None, None, 0.5],
                            [random.Random(seed), random.Random(1), random.Random(2)])
        assert int(mixed[0]) == alone


# --- bias, penalties, min_p and log-probabilities ---


def draws(logits: torch.Tensor, n: int = 400, temperature: float = 1.0, **kw) -> set[int]:
    import random

    g = random.Random(0)
    return {int(sample_next(logits, temperature, generator=g, **kw)) for _ in range(n)}


def test_min_p_keeps_ids_at_least_min_p_times_the_top_after_temperature():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert draws(probs.log(), min_p=0.25) == {0, 1, 2}  # 0.15 >= 0.125 > 0.05
    assert draws(probs.log(), min_p=0.5) == {0, 1}
    assert draws(probs.log(), min_p=1.0) == {0}
    # at temperature 0.5 the probabilities go as p^2: ratios to the top 0.36, 0.09, 0.01
    assert draws(probs.log(), temperature=0.5, min_p=0.05) == {0, 1, 2}
    assert draws(probs.log(), min_p=0.05) == {0, 1, 2, 3}


def test_logit_bias_is_added_first_and_minus_100_bans_even_when_hot_and_greedy():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    assert torch.equal(adjust_logits(logits, {1: 2.5, 3: -0.5}), torch.tensor([[1.0, 4.5, 3.0, 0.0]]))
    dense = torch.tensor([0.0, 0.0, -7.0, 1.0])
    assert torch.equal(adjust_logits(logits, dense), logits + dense)
    assert adjust_logits(logits, {2: -100})[0, 2] == float("-inf")
    assert 2 not in draws(logits, n=2000, temperature=5.0, logit_bias={2: -100})
    assert draws(logits, n=1000, temperature=5.0, logit_bias={0: -100, 1: -100, 3: -100}) == {2}
    assert int(sample_next(logits, 0, logit_bias={2: -100})) == 1  # greedy takes the bias too
    assert int(sample_next(logits, 0, logit_bias={3: 100})) == 3


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_recent_ids():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = adjust_logits(logits, recent=[0, 1, 1], repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # ids 2 and 3 are not in the window: unchanged
    assert adjust_logits(logits, recent=[0, 1, 1], repetition_penalty=0.5).tolist() == [[4.0, -1.0, 1.0, 0.5]]


def test_presence_and_frequency_penalties_count_the_window():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = adjust_logits(logits, recent=[0, 1, 1], presence_penalty=0.5, frequency_penalty=0.25)
    assert out.tolist() == [[2.0 - 0.25 - 0.5, -2.0 - 0.5 - 0.5, 1.0, 0.5]]
    # only what is in the window counts: a character that left it is not penalized any more
    assert adjust_logits(logits, recent=[1, 2], frequency_penalty=1.0).tolist() == [[2.0, -3.0, 0.0, 0.5]]
    assert adjust_logits(logits, recent=[], frequency_penalty=1.0) is logits
    assert adjust_logits(logits, recent=[0], repetition_penalty=1.0, presence_penalty=0.0) is logits


def test_penalties_apply_to_greedy_rows():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert int(sample_next(logits, 0)) == 0
    assert int(sample_next(logits, 0, recent=[0], repetition_penalty=1.1)) == 1
    assert int(sample_next(logits, 0, recent=[0, 0], frequency_penalty=0.1)) == 1
    assert int(sample_next(logits, 0, recent=[0], presence_penalty=0.05)) == 0  # 2.95 > 2.9


def test_a_control_changes_its_own_row_and_no_other():
    import random

    torch.manual_seed(5)
    logits = torch.randn(4, 30)
    controls = dict(min_p=[None, 0.1, None, None], logit_bias=[None, None, {3: -100, 4: 2.0}, None],
                    recent=[None, None, None, [1, 2, 2, 7]], repetition_penalty=[1.0, 1.0, 1.0, 1.3],
                    presence_penalty=[0.0, 0.0, 0.0, 0.4], frequency_penalty=[0.0, 0.0, 0.0, -0.2])
    adjusted = adjust_logits(logits, controls["logit_bias"], controls["recent"], controls["repetition_penalty"],
                             controls["presence_penalty"], controls["frequency_penalty"])
    assert torch.equal(adjusted[:2], logits[:2]) and not torch.equal(adjusted[2:], logits[2:])
    for seed in range(40):
        plain = sample_next(logits, 1.0, generator=[random.Random(seed + r) for r in range(4)])
        mixed = sample_next(logits, 1.0, generator=[random.Random(seed + r) for r in range(4)], **controls)
        assert int(mixed[0]) == int(plain[0])  # row 0 has no control: today's draw, exactly
        assert int(mixed[2]) != 3
        for r in range(4):  # and every row draws alone what it draws beside the others
            alone = {k: v[r] for k, v in controls.items()}
            assert int(sample_next(logits[r : r + 1], 1.0, generator=random.Random(seed + r), **alone)) == int(mixed[r])


def test_logprobs_are_the_raw_log_softmax_and_the_top_k_in_order():
    torch.manual_seed(2)
    logits = torch.randn(3, 20)
    chosen = torch.tensor([4, 0, 19])
    lp = torch.log_softmax(logits, dim=-1)
    mine, top, ids = chosen_and_top(lp, chosen, 5)
    assert torch.equal(mine, lp[torch.arange(3), chosen])
    assert torch.equal(top, lp.sort(dim=-1, descending=True).values[:, :5])
    assert torch.equal(lp.gather(1, ids), top)
    for r in range(3):  # a row's log-probabilities do not depend on the rows computed with it
        alone = torch.log_softmax(logits[r : r + 1], dim=-1)
        assert torch.equal(alone[0], lp[r])
    # ties are ordered by id
    _, _, tied = chosen_and_top(torch.log_softmax(torch.zeros(1, 6), dim=-1), torch.tensor([0]), 3)
    assert tied.tolist() == [[0, 1, 2]]
