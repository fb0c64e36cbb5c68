import pytest
import torch

from shapkern.explainers import ValueFunction
from shapkern.explainers.metrics import (
    auroc,
    faithfulness_correlation,
    insertion_deletion,
    localization,
    miou_best_threshold,
    patch_labels,
    pointing_game,
    relative_l2,
    sensitivity_n,
    spearman,
    topk_precision,
)


def additive_game(weights: torch.Tensor, classes: int = 2) -> ValueFunction:
    """v(S) = Σ_{i∈S} w_i for class 0 and its negative for class 1: (B, N) weights."""
    calls = []

    def fn(coalitions):
        calls.append(coalitions.shape)
        value = (coalitions.double() * weights.unsqueeze(1)).sum(-1)
        return torch.stack([value, -value], -1)

    game = ValueFunction(fn, weights.shape[0], weights.shape[1])
    game.calls = calls
    return game


def test_insertion_deletion_known_curves_in_one_call():
    weights = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    game = additive_game(weights)
    out = insertion_deletion(game, weights, torch.tensor([0]), output="logit")
    assert game.calls == [(1, 10, 4)]  # both chains of N + 1 coalitions, one call
    torch.testing.assert_close(out["insertion"], torch.tensor([[0.0, 1, 1, 1, 1]], dtype=torch.float64))
    torch.testing.assert_close(out["deletion"], torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64))
    assert out["insertion_auc"].item() == pytest.approx(0.875)
    assert out["deletion_auc"].item() == pytest.approx(0.125)
    # The reversed ranking is the worst one.
    worst = insertion_deletion(game, -weights, torch.tensor([0]), output="logit")
    assert worst["insertion_auc"].item() == pytest.approx(0.125)
    # Probabilities: softmax of (v, -v) for class 0.
    prob = insertion_deletion(game, weights, torch.tensor([0]))
    assert prob["insertion"][0, 0].item() == pytest.approx(0.5)
    assert prob["insertion"][0, 1].item() == pytest.approx(torch.tensor([1.0, -1.0]).softmax(0)[0].item())


def test_faithfulness_of_exact_and_random_attributions():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    game = additive_game(weights)
    target = torch.zeros(3, dtype=torch.long)
    corr = faithfulness_correlation(game, weights, target)
    torch.testing.assert_close(corr, torch.ones(3, dtype=torch.float64))
    sizes, sens = sensitivity_n(game, weights, target, sizes=[1, 4, 8])
    assert sizes == [1, 4, 8] and sens.shape == (3, 3)
    torch.testing.assert_close(sens, torch.ones(3, 3, dtype=torch.float64))
    # Attributions orthogonal to the weights and to 1 are uncorrelated with the game in expectation
    # (Cov(z) = a I + b 11ᵀ); with 128 samples SE(r) ≈ 0.09, so |r| < 0.4 holds at > 4 sigma.
    basis = torch.stack([torch.ones_like(weights), weights], -1)
    noise = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    noise = noise - (basis @ torch.linalg.lstsq(basis, noise.unsqueeze(-1)).solution)[..., 0]
    assert faithfulness_correlation(game, noise, target).abs().max() < 0.4
    # Explaining class 1 (= -v) with the class-0 attributions: perfectly anti-correlated.
    torch.testing.assert_close(faithfulness_correlation(game, weights, target + 1), -torch.ones(3).double())


def test_errors_against_a_reference():
    ref = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(relative_l2(ref, ref), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(relative_l2(2 * ref, ref), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(spearman(ref.exp(), ref), torch.ones(2, dtype=torch.float64))  # monotone
    torch.testing.assert_close(spearman(-ref, ref), -torch.ones(2, dtype=torch.float64))
    swapped = torch.tensor([[3.0, 4.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(spearman(swapped, ref), torch.tensor([0.6, 1.0], dtype=torch.float64))
    guess = torch.tensor([[4.0, 0.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    torch.testing.assert_close(topk_precision(guess, ref, 2), torch.tensor([0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(topk_precision(ref.unsqueeze(-1), ref, 4), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="k must lie in 1..4"):
        topk_precision(ref, ref, 5)


def test_localisation_known_answers():
    # 8x8 pixel masks on a 2x2 grid of 4x4 patches; image 0: top-left patch, image 1: right column.
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, :, 4:] = True
    labels = patch_labels(masks, (2, 2))
    torch.testing.assert_close(
        labels, torch.tensor([[True, False, False, False], [False, True, False, True]])
    )
    perfect = labels.double()
    assert localization(perfect, masks) == pytest.approx(
        {"pointing": 1.0, "auroc": 1.0, "miou": 1.0, "miou_threshold": 0.01}
    )
    torch.testing.assert_close(pointing_game(-perfect, labels), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(auroc(-perfect, labels), torch.zeros(2, dtype=torch.float64))
    half = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 3.0, 2.0, 1.0]])  # image 1: positives ranked 1st and 3rd
    torch.testing.assert_close(auroc(half, labels), torch.tensor([1.0, 0.75], dtype=torch.float64))
    miou, _ = miou_best_threshold(half, labels)
    # Normalised: image 0 [1, 1/3, 2/3, 0], image 1 [0, 1, 2/3, 1/3]. For t in (2/3, 1] the top patch
    # of each: IoU 1 and 1/2 (the best); (1/3, 2/3]: 1/2 and 1/3; (0, 1/3]: 1/3 and 2/3.
    assert miou == pytest.approx(0.75)
    empty = torch.zeros(1, 4, dtype=torch.bool)
    assert torch.isnan(pointing_game(torch.rand(1, 4), empty)).all()
    assert torch.isnan(auroc(torch.rand(1, 4), empty)).all()
