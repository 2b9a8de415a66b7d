import torch

from charrnn.sampling import sample_next


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
