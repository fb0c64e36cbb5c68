import math

import pytest
import torch
from tiny_models import TINY, tiny_shapley_vit, tiny_vit
from torch import nn

from shapkern.explainers import Attribution, estimate, explain
from shapkern.games import ValueFunction, model_game


def table_game(table: torch.Tensor, calls: list | None = None) -> ValueFunction:
    """A game given by its full table: (B, 2^N, K), coalition index = Σ_n z_n 2^n. ``calls``
    collects the coalitions (B, M, N) of every call."""
    batch, size, _ = table.shape

    def fn(coalitions):
        if calls is not None:
            calls.append(coalitions.clone())
        index = index_of(coalitions)  # (B, M)
        return torch.stack([table[b, index[b]] for b in range(batch)])

    return ValueFunction(fn, batch, size.bit_length() - 1, table.device)


def index_of(z):
    """bool (..., N) -> int64 (...) the table index Σ_n z_n 2^n."""
    return (z.long() << torch.arange(z.shape[-1], device=z.device)).sum(-1)


def brute_force_shapley(table: torch.Tensor) -> torch.Tensor:
    """φ_i = Σ_{S ⊆ N∖i} |S|!(N-|S|-1)!/N! (v(S∪i) - v(S)), straight from the definition."""
    batch, size, classes = table.shape
    players = size.bit_length() - 1
    phi = torch.zeros(batch, players, classes, dtype=torch.float64)
    for i in range(players):
        for s in range(size):
            if not s >> i & 1:
                k = s.bit_count()
                weight = math.factorial(k) * math.factorial(players - k - 1) / math.factorial(players)
                phi[:, i] += weight * (table[:, s | 1 << i] - table[:, s])
    return phi


def random_table(batch, players, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1 << players, classes, generator=gen, dtype=torch.float64)


def smooth_table(batch, players, classes, seed):
    """An additive part, a smooth non-additive part (a tanh network of z) and 0.1 of white noise:
    closer to a model's game than white noise, whose Shapley values no estimator can learn."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.arange(1 << players).unsqueeze(-1) >> torch.arange(players) & 1).double()
    w = torch.randn(batch, players, classes, generator=gen, dtype=torch.float64)
    h = torch.randn(batch, players, 8, generator=gen, dtype=torch.float64)
    smooth = torch.tanh(torch.einsum("mn,bnh->bmh", z - 0.5, h)).sum(-1, keepdim=True)
    noise = 0.1 * torch.randn(batch, z.shape[0], 1, generator=gen, dtype=torch.float64)
    return torch.einsum("mn,bnk->bmk", z, w) + smooth + noise


def relative_error(att, exact):
    return float((att.values - exact).norm() / exact.norm())


DESIGNED = ["kernel", "leverage", "bayes"]  # distinct coalitions from a design drawn on the CPU


@pytest.mark.parametrize("players", [1, 2, 5, 8])
def test_exact_matches_brute_force(players):
    table = random_table(2, players, 3, seed=players)
    att = estimate(table_game(table), method="exact", target="all", progress=False)
    assert att.values.shape == (2, players, 3)
    assert att.evaluations == 1 << players
    torch.testing.assert_close(att.values, brute_force_shapley(table), rtol=0, atol=1e-12)
    torch.testing.assert_close(att.base, table[:, 0])
    torch.testing.assert_close(att.full, table[:, -1])
    assert att.efficiency_gap().abs().max() < 1e-12


def test_exact_chunking_does_not_change_the_result():
    table = random_table(1, 6, 2, seed=1)
    whole = estimate(table_game(table), method="exact", target="all", progress=False).values
    chunked = estimate(
        table_game(table), method="exact", coalitions_per_call=5, target="all", progress=False
    ).values
    torch.testing.assert_close(whole, chunked, rtol=0, atol=1e-12)


def test_exact_additive_game_gives_the_weights_and_symmetric_players_tie():
    weights = torch.tensor([[0.5, -1.0, 2.0, 0.0, 3.0]], dtype=torch.float64)
    additive = ValueFunction(lambda z: (z.double() * weights.unsqueeze(1)).sum(-1, keepdim=True) + 7.0, 1, 5)
    att = estimate(additive, method="exact", target="all", progress=False)
    torch.testing.assert_close(att.values[..., 0], weights, rtol=0, atol=1e-12)
    # Players 0 and 1 enter only through z_0 + z_1, players 2 and 3 only through z_2 z_3.
    symmetric = ValueFunction(
        lambda z: ((z[..., 0] + z[..., 1]).double() ** 2 + 3 * (z[..., 2] & z[..., 3]).double()).unsqueeze(
            -1
        ),
        1,
        5,
    )
    phi = estimate(symmetric, method="exact", target="all", progress=False).values[0, :, 0]
    torch.testing.assert_close(phi[0], phi[1])
    torch.testing.assert_close(phi[2], phi[3])
    assert abs(phi[4]) < 1e-12  # a null player


def test_exact_refuses_more_than_20_players():
    game = ValueFunction(lambda z: z.double().sum(-1, keepdim=True), 1, 21)
    with pytest.raises(ValueError, match=r"N <= 20 players; this model has N = 21"):
        estimate(game, method="exact", target="all", progress=False)


def test_permutation_converges_to_exact():
    table = random_table(2, 6, 2, seed=3)
    exact = brute_force_shapley(table)
    errors = []
    for budget in (64, 256, 1024, 4096):
        att = estimate(
            table_game(table), method="permutation", budget=budget, seed=0, target="all", progress=False
        )
        assert att.evaluations <= budget
        errors.append(relative_error(att, exact))
    assert errors[-1] < 0.2 and errors[-1] < errors[0] / 3, errors


@pytest.mark.parametrize("method", DESIGNED)
def test_designed_estimators_converge_and_are_exact_once_the_budget_covers_every_coalition(method):
    table = smooth_table(2, 8, 2, seed=3)
    exact = brute_force_shapley(table)
    errors = []
    for budget in (40, 100, 200, 1000):
        att = estimate(table_game(table), method=method, budget=budget, seed=0, target="all", progress=False)
        assert att.evaluations == min(budget, 256)
        errors.append(relative_error(att, exact))
    assert errors[2] < errors[0] / 2 and errors[-1] < 1e-10, errors
    if method != "bayes":  # the sandwich of an enumeration is zero; bayes' posterior is not
        assert att.std_error.abs().max() < 1e-10


@pytest.mark.parametrize("method", DESIGNED)
def test_designed_estimators_evaluate_distinct_coalitions_and_count_them(method):
    calls = []
    game = table_game(smooth_table(3, 10, 2, seed=2), calls)
    att = estimate(
        game, method=method, budget=300, seed=2, coalitions_per_call=64, target="all", progress=False
    )
    rows = torch.cat(calls, 1)
    assert rows.shape[1] == att.evaluations == 300
    assert max(call.shape[1] for call in calls) <= 64
    assert torch.unique(rows[0], dim=0).shape[0] == 300
    assert all(torch.equal(rows[0], rows[b]) for b in range(1, 3))  # one design for the batch
    odd = estimate(
        game, method=method, budget=301, seed=2, target="all", progress=False
    )  # pairs: one left over
    assert odd.evaluations == 300


@pytest.mark.parametrize("method", DESIGNED)
def test_designed_estimators_are_deterministic_and_batch_invariant(method):
    table = smooth_table(3, 11, 2, seed=5)  # bayes: at N <= 9 its greedy pool is every pair, seed or not
    a = estimate(table_game(table), method=method, budget=200, seed=5, target="all", progress=False)
    b = estimate(table_game(table), method=method, budget=200, seed=5, target="all", progress=False)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    alone = estimate(table_game(table[1:2]), method=method, budget=200, seed=5, target="all", progress=False)
    torch.testing.assert_close(alone.values, a.values[1:2], rtol=0, atol=1e-10)
    other = estimate(table_game(table), method=method, budget=200, seed=6, target="all", progress=False)
    assert not torch.equal(other.values, a.values)


def test_seed_none_draws_a_fresh_design_but_bayes_reuses_its_cached_greedy_pairs():
    table = smooth_table(1, 11, 1, seed=3)
    first, second = (
        estimate(table_game(table), method="kernel", budget=200, target="all", progress=False)
        for _ in range(2)
    )
    assert not torch.equal(first.values, second.values)
    first, second = (
        estimate(table_game(table), method="bayes", budget=200, target="all", progress=False)
        for _ in range(2)
    )
    torch.testing.assert_close(first.values, second.values, rtol=0, atol=0)
    seeded = estimate(table_game(table), method="bayes", budget=200, seed=0, target="all", progress=False)
    torch.testing.assert_close(first.values, seeded.values, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("method", DESIGNED)
def test_designed_estimators_on_cuda_match_the_cpu(method):
    """The design is drawn on the CPU; A, b (packed ops), the solve and the Gaussian process run on
    the game's device."""
    table = smooth_table(2, 11, 2, seed=7)
    cpu = estimate(table_game(table), method=method, budget=300, seed=0, target="all", progress=False)
    gpu = estimate(table_game(table.cuda()), method=method, budget=300, seed=0, target="all", progress=False)
    assert gpu.values.is_cuda and gpu.evaluations == cpu.evaluations == 300
    torch.testing.assert_close(gpu.values.cpu(), cpu.values, rtol=0, atol=1e-9)
    torch.testing.assert_close(gpu.std_error.cpu(), cpu.std_error, rtol=1e-6, atol=1e-9)


def test_bayes_is_the_most_accurate_per_evaluation_on_a_smooth_game():
    """Mean error over seeds on a smooth game at 200 of 1024 evaluations: bayes clearly below kernel
    and leverage (the full comparison is benchmarks/estimators.py)."""
    table = smooth_table(4, 10, 1, seed=8)
    exact = brute_force_shapley(table)
    error = {}
    for method in DESIGNED:
        runs = [
            estimate(table_game(table), method=method, budget=200, seed=s, target="all", progress=False)
            for s in range(4)
        ]
        error[method] = sum(relative_error(run, exact) for run in runs) / len(runs)
    assert error["bayes"] < 0.8 * min(error["kernel"], error["leverage"]), error


def test_bayes_turns_into_a_control_variate_past_max_pairs():
    from shapkern.explainers.estimators import Bayes, endpoints

    table = smooth_table(2, 11, 2, seed=9)
    exact = brute_force_shapley(table)
    calls = []
    game = table_game(table, calls)
    base, full, _ = endpoints(game)
    bayes = Bayes(seed=0, coalitions_per_call=512, progress=False, max_pairs=200)
    phi, se, evals = bayes.approximate(game, 1200, base, full)
    rows = torch.cat(calls, 1)[0]
    assert evals == rows.shape[0] == 1200 and torch.unique(rows, dim=0).shape[0] == 1200
    assert (phi.sum(1) - (full - base)).abs().max() < 1e-10
    plain = estimate(table_game(table), method="leverage", budget=1200, seed=0, target="all", progress=False)
    assert float((phi - exact).norm()) < float((plain.values - exact).norm())
    assert se.shape == phi.shape and (se > 0).all()


@pytest.mark.parametrize("method", DESIGNED)
def test_standard_errors_are_roughly_calibrated(method):
    """RMS of (φ̂ - φ) / SE over seeds, players and images near 1 on a smooth game."""
    table = smooth_table(4, 10, 1, seed=4)
    exact = brute_force_shapley(table)
    runs = [
        estimate(table_game(table), method=method, budget=200, seed=s, target="all", progress=False)
        for s in range(4)
    ]
    z = torch.cat([(run.values - exact) / run.std_error for run in runs])
    rms = float(z.square().mean().sqrt())
    assert 0.5 < rms < 2.0, rms


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("method", ["kernel", "permutation"])
def test_sampling_mean_over_seeds_lies_within_the_standard_error(method, paired):
    """Statistical check, all seeded. Over S = 30 seeds, every |mean φ - exact| ≤ 4 · SE / sqrt(S)
    (SE = the mean reported standard error; 4 sigma over 12 entries: a false alarm has probability
    < 1e-3), and the reported SE matches the spread across seeds within a factor of 2."""
    seeds = 30
    players, budget = (6, 202) if method == "permutation" else (8, 90)  # kernel: below 2^N
    table = random_table(1, players, 2, seed=4)
    exact = brute_force_shapley(table)
    runs = [
        estimate(
            table_game(table),
            method=method,
            budget=budget,
            paired=paired,
            seed=s,
            target="all",
            progress=False,
        )
        for s in range(seeds)
    ]
    values = torch.stack([r.values for r in runs])
    se = torch.stack([r.std_error for r in runs]).mean(0)
    assert ((values.mean(0) - exact).abs() <= 4 * se / seeds**0.5).all()
    ratio = values.std(0) / se
    assert ((ratio > 0.5) & (ratio < 2)).all(), ratio


def test_efficiency_holds_for_every_estimator():
    table = random_table(2, 7, 3, seed=5)
    for method in ("exact", "kernel", "leverage", "bayes", "permutation"):
        budget = None if method == "exact" else 60  # exact refuses a budget below 2^N
        att = estimate(table_game(table), method=method, budget=budget, seed=0, target="all", progress=False)
        # regressions: the exact constraint; bayes: the pair (∅, N) is exact; permutation: every
        # ordering telescopes.
        assert att.efficiency_gap().abs().max() < 1e-10, method


@pytest.mark.parametrize("method", ["kernel", "leverage"])
def test_kernel_stops_early_at_tol_on_a_design_drawn_in_rounds(method):
    table = smooth_table(1, 11, 1, seed=6)
    exact = brute_force_shapley(table)
    calls = []
    tol = float(
        estimate(
            table_game(table), method=method, budget=400, seed=1, target="all", progress=False
        ).std_error.max()
    )
    att = estimate(
        table_game(table, calls),
        method=method,
        budget=1000,
        tol=tol,
        coalitions_per_call=32,
        seed=0,
        target="all",
        progress=False,
    )
    rows = torch.cat(calls, 1)[0]
    assert att.evaluations == rows.shape[0] < 700 and torch.unique(rows, dim=0).shape[0] == rows.shape[0]
    assert att.std_error.max() < tol
    assert relative_error(att, exact) < 2 * tol * exact.shape[1] ** 0.5 / exact.norm()
    # The rounds are prefixes of the whole design: every coalition evaluated belongs to it.
    design = []
    estimate(table_game(table, design), method=method, budget=1000, seed=0, target="all", progress=False)
    assert torch.isin(index_of(rows), index_of(torch.cat(design, 1)[0])).all()


def test_auto_picks_exact_then_bayes_then_leverage():
    from shapkern.explainers import resolve_method

    vit = nn.Linear(1, 1)
    assert resolve_method("auto", vit, 16) == "exact"
    assert resolve_method("auto", vit, 16, budget=1 << 16) == "exact"
    assert resolve_method("auto", vit, 16, budget=100) == "bayes"  # an explicit budget is a limit
    assert resolve_method("auto", vit, 16, budget=33) == "leverage"
    assert resolve_method("auto", vit, 18, budget=1 << 18) == "exact"
    assert resolve_method("auto", vit, 196) == "bayes"
    assert resolve_method("auto", vit, 196, budget=394) == "bayes"
    assert resolve_method("auto", vit, 196, budget=393) == "leverage"
    assert resolve_method("auto", vit, 196, tol=0.01) == "leverage"  # bayes has no tol
    assert resolve_method("auto", SoftVoting(), 4) == "self"
    assert resolve_method("auto", SoftVoting(), 4, mode="input") == "exact"  # its pixel game
    assert resolve_method("kernel", vit, 196) == "kernel"
    game = table_game(smooth_table(1, 17, 1, seed=0))
    att = estimate(game, budget=100, seed=0, target="all", progress=False)
    assert att.method == "bayes" and att.evaluations == 100
    assert estimate(game, budget=30, seed=0, target="all", progress=False).method == "leverage"


@pytest.mark.parametrize("budget", [512, 6])
def test_auto_keeps_an_explicit_budget_at_16_players(budget):
    game = table_game(smooth_table(1, 16, 1, seed=0))
    att = estimate(game, budget=budget, seed=0, target="all", progress=False)
    assert att.method in ("bayes", "leverage") and att.evaluations <= budget


@pytest.mark.parametrize("budget", [0, -5, 2.5, True])
def test_a_budget_that_is_not_a_positive_int_is_refused(budget):
    game = table_game(smooth_table(1, 16, 1, seed=0))
    with pytest.raises(ValueError, match="budget must be a positive int"):
        estimate(game, budget=budget, target="all", progress=False)
    with pytest.raises(ValueError, match="budget must be a positive int"):
        classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        explain(classifier, torch.randn(1, 1, 4, 4), budget=budget, players=16, progress=False)


@pytest.mark.parametrize("budget", [1, 5])
def test_auto_refuses_a_budget_below_the_smallest_design(budget):
    game = table_game(smooth_table(1, 16, 1, seed=0))
    with pytest.raises(ValueError, match=rf"budget={budget} is too small for method='leverage'"):
        estimate(game, budget=budget, target="all", progress=False)


def test_batch_size_is_a_deprecated_spelling_of_coalitions_per_call():
    game = table_game(random_table(1, 6, 1, seed=3))
    want = estimate(game, method="exact", coalitions_per_call=7, target="all", progress=False)
    with pytest.warns(DeprecationWarning, match="coalitions_per_call"):
        got = estimate(game, method="exact", batch_size=7, target="all", progress=False)
    torch.testing.assert_close(got.values, want.values)


def test_exact_refuses_an_explicit_budget_below_2_to_the_n():
    game = table_game(smooth_table(1, 8, 1, seed=0))
    assert estimate(game, method="exact", target="all", progress=False).evaluations == 256
    assert estimate(game, method="exact", budget=256, target="all", progress=False).evaluations == 256
    too_small = r"budget=255 is too small for method='exact': it needs at least 256 "
    with pytest.raises(ValueError, match=too_small):
        estimate(game, method="exact", budget=255, target="all", progress=False)


def test_explain_runs_under_inference_mode():
    vit = tiny_vit(sizes=TINY, noise=0.1, img_size=32)
    images = torch.randn(2, 3, 32, 32)
    expected = explain(vit, images, method="kernel", budget=64, seed=0, progress=False).values
    with torch.inference_mode():
        got = explain(vit, images, method="kernel", budget=64, seed=0, progress=False).values
    torch.testing.assert_close(got, expected)


def test_bayes_refuses_tol_unpaired_and_small_budgets():
    game = table_game(smooth_table(1, 8, 1, seed=0))
    with pytest.raises(ValueError, match="method='bayes' is paired .*tol=0.1"):
        estimate(game, method="bayes", tol=0.1, target="all", progress=False)
    with pytest.raises(ValueError, match="paired=False"):
        estimate(game, method="bayes", paired=False, target="all", progress=False)
    with pytest.raises(ValueError, match=r"budget=17 is too small for method='bayes': it needs at least 18"):
        estimate(game, method="bayes", budget=17, target="all", progress=False)
    with pytest.raises(ValueError, match=r"budget=5 is too small for method='leverage'"):
        estimate(game, method="leverage", budget=5, target="all", progress=False)


def test_estimate_and_explain_default_to_the_predicted_class():
    """One default per option: estimate's target is "pred", as explain's."""
    table = random_table(3, 4, 5, seed=7)
    default = estimate(table_game(table), method="exact", progress=False)
    pred = estimate(table_game(table), method="exact", target="pred", progress=False)
    assert default.values.shape == (3, 4, 1)
    torch.testing.assert_close(default.values, pred.values)
    torch.testing.assert_close(default.target, pred.target)


def test_the_estimator_names_are_the_registry():
    """The Literal type of ``method`` and the registry cannot drift apart."""
    from typing import get_args

    from shapkern.explainers import ESTIMATORS, GAME_METHODS, METHODS, EstimatorName

    assert tuple(ESTIMATORS) == get_args(EstimatorName)
    assert GAME_METHODS == ("auto", *ESTIMATORS) and METHODS == (*GAME_METHODS, "self")


def test_targets():
    table = random_table(3, 4, 5, seed=7)
    game = table_game(table)
    pred = estimate(game, method="exact", target="pred", progress=False)
    assert pred.values.shape == (3, 4, 1)
    torch.testing.assert_close(pred.target[:, 0], table[:, -1].argmax(-1))
    every = estimate(game, method="exact", target="all", progress=False)
    torch.testing.assert_close(pred.values[..., 0], every.values[torch.arange(3), :, pred.target[:, 0]])
    one = estimate(game, method="exact", target=2, progress=False)
    torch.testing.assert_close(one.values[..., 0], every.values[..., 2])
    per_image = estimate(game, method="exact", target=torch.tensor([0, 4, 1]), progress=False)
    torch.testing.assert_close(per_image.values[2, :, 0], every.values[2, :, 1])
    with pytest.raises(ValueError, match="target class 5 is out of range: the model has 5 classes"):
        estimate(game, method="exact", target=5, progress=False)
    with pytest.raises(ValueError, match="3 images"):
        estimate(game, method="exact", target=torch.tensor([0, 1]), progress=False)
    with pytest.raises(ValueError, match="budget=4 is too small"):
        estimate(game, method="permutation", budget=4, target="all", progress=False)


def test_explain_a_timm_vit_through_the_engine():
    model = tiny_vit(sizes=TINY, noise=0.1)
    images = torch.randn(2, 3, 24, 24)
    att = explain(model, images, method="exact", progress=False)
    assert isinstance(att, Attribution) and att.values.shape == (2, 9, 1)
    logits = model(images)
    torch.testing.assert_close(att.target[:, 0], logits.argmax(-1))
    torch.testing.assert_close(att.full[:, 0], logits.max(-1).values, rtol=1e-4, atol=1e-5)
    assert att.efficiency_gap().abs().max() < 1e-4
    # The same game through timm's own forward with a key mask, enumerated by brute force.
    game = model_game(model, images)
    coalitions = (torch.arange(512).unsqueeze(-1) >> torch.arange(9)) & 1 == 1
    with torch.no_grad():
        table = game(coalitions.expand(2, -1, -1)).double()
    want = brute_force_shapley(table)[torch.arange(2), :, att.target[:, 0]]
    torch.testing.assert_close(att.values[..., 0].double(), want, rtol=1e-4, atol=1e-5)
    kernel = explain(model, images, method="kernel", budget=128, seed=0, progress=False)
    assert kernel.efficiency_gap().abs().max() < 1e-4 and kernel.evaluations == 128


def test_explain_any_classifier_by_pixel_masking():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()
    images = torch.randn(2, 1, 8, 8)
    att = explain(model, images, method="exact", players=4, progress=False)
    assert att.values.shape == (2, 4, 1)
    torch.testing.assert_close(att.full[:, 0], model(images).max(-1).values)
    torch.testing.assert_close(att.base[:, 0], model(torch.zeros_like(images)).gather(-1, att.target)[:, 0])
    with pytest.raises(ValueError, match="pass players=N"):
        explain(model, images, method="exact", progress=False)


def test_bad_images_fail_clearly():
    model = tiny_vit(sizes=TINY, noise=0.1)
    with pytest.raises(ValueError, match=r"takes 3x24x24 images .*got 3x32x32"):
        explain(model, torch.randn(1, 3, 32, 32), method="kernel", progress=False)
    with pytest.raises(ValueError, match="floating"):
        explain(model, torch.zeros(3, 24, 24), progress=False)
    with pytest.raises(ValueError, match="self-explaining"):
        explain(model, torch.randn(1, 3, 24, 24), method="self", progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        explain(model, torch.randn(1, 3, 24, 24), method="lime", progress=False)


class SoftVoting(nn.Module):
    """A minimal self-explaining model: per-patch scores Φ, prediction Σ_n Φ_n, v(S) = Σ_{n∈S} Φ_n."""

    num_players, num_classes = 4, 3

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 3)

    def phi(self, images):
        return self.proj(images.unfold(2, 4, 4).unfold(3, 4, 4).reshape(images.shape[0], 4, 16))

    def forward(self, images):
        phi = self.phi(images)
        return phi, phi.sum(1)

    def coalition_values(self, images, coalitions):
        return torch.einsum("bmn,bnk->bmk", coalitions.float(), self.phi(images))

    def coalition_forward(self, images, **options):
        return lambda coalitions: self.coalition_values(images, coalitions)


def test_self_explanation_is_one_forward_and_matches_exact_on_an_additive_model():
    torch.manual_seed(0)
    model, images = SoftVoting(), torch.randn(2, 1, 8, 8)
    own = explain(model, images, method="self", target="all")
    assert own.evaluations == 1 and own.values.shape == (2, 4, 3)
    exact = explain(model, images, method="exact", target="all", progress=False)
    torch.testing.assert_close(own.values, exact.values, rtol=1e-5, atol=1e-5)
    assert own.efficiency_gap().abs().max() < 1e-5


def test_shapley_vit_is_explained_through_its_own_value_function():
    model = tiny_shapley_vit(4, img_size=24, patch_size=8)
    images = torch.randn(2, 3, 24, 24)
    own = explain(model, images, method="self")
    exact = explain(model, images, method="exact", progress=False)
    torch.testing.assert_close(exact.base, torch.zeros(2, 1))  # v(∅) = 0 for soft voting
    torch.testing.assert_close(exact.full, own.full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(own.target, exact.target)
    assert exact.efficiency_gap().abs().max() < 1e-4 and own.efficiency_gap().abs().max() < 1e-4


def test_shapley_vit_in_input_mode_is_its_logits_on_pixel_masked_images():
    """mode="input" on a self-explaining model: f(x) = Σ Φ of the image with absent patches
    zeroed; mode="packed" is its own coalition_values."""
    model = tiny_shapley_vit(4, img_size=24, patch_size=8)
    images = torch.randn(2, 3, 24, 24)
    coalitions = torch.rand(2, 5, 9) < 0.5
    pixels = coalitions.view(2, 5, 3, 3).repeat_interleave(8, 2).repeat_interleave(8, 3).unsqueeze(2)
    with torch.no_grad():
        want = model((images.unsqueeze(1) * pixels).flatten(0, 1)).logits.view(2, 5, 4)
        torch.testing.assert_close(model_game(model, images, mode="input")(coalitions), want)
        packed = model_game(model, images, mode="packed")(coalitions)
        torch.testing.assert_close(packed, model.coalition_values(images, coalitions))
    att = explain(model, images, mode="input", progress=False)  # auto: exact, not its own Φ
    assert att.evaluations == 2**9 and att.efficiency_gap().abs().max() < 1e-4


@pytest.mark.parametrize("mode", [None, "input"])
def test_a_players_count_unlike_the_models_is_refused(mode):
    model = tiny_vit()  # 32 px in 8 px patches: N = 16
    with pytest.raises(ValueError, match="players=9 but the model has 16 patches"):
        model_game(model, torch.randn(1, 3, 32, 32), players=9, mode=mode)
