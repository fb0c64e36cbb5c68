import importlib
import sys

import numpy as np
import pytest
import torch
from tiny_models import TINY, tiny_shapley_vit, tiny_vit
from torch import nn

import shapkern
from shapkern.games import model_game


@pytest.fixture
def sq():
    """shapiq, or a skip when it is not installed."""
    return pytest.importorskip("shapiq")


@pytest.fixture
def integration(sq):
    return importlib.import_module("shapkern.integrations.shapiq")


def vit9(seed=0):
    """A timm ViT on 24x24 images in 8x8 patches: N = 9 players, 4 classes."""
    return tiny_vit(seed=seed, noise=0.1, sizes=TINY)


def shapley_vit9(seed=0):
    return tiny_shapley_vit(4, seed=seed, img_size=24, patch_size=8)


def tiny_cnn(seed=0):
    """Not a ViT: explained by pixel masking on a 2x2 grid (players=4)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()


CASES = {
    "timm vit (packed engine)": (vit9, (3, 24, 24), {}),
    "shapley vit (coalition_values)": (shapley_vit9, (3, 24, 24), {}),
    "cnn (pixel masking)": (tiny_cnn, (3, 8, 8), {"players": 4}),
    "timm vit, mode='input'": (vit9, (3, 24, 24), {"mode": "input", "baseline": "mean"}),
}


def random_coalitions(count, players, seed):
    """count random coalitions plus the empty and the full one, bool (count + 2, N)."""
    rng = np.random.default_rng(seed)
    z = rng.random((count, players)) < rng.random((count, 1))
    return np.concatenate([np.zeros((1, players), bool), z, np.ones((1, players), bool)])


@pytest.mark.parametrize("case", list(CASES))
def test_game_values_equal_the_value_function(integration, case):
    build, shape, options = CASES[case]
    model, image = build(), torch.randn(*shape)
    players = 4 if "players" in options else 9
    coalitions = random_coalitions(40, players, seed=1)
    with torch.no_grad():
        want = model_game(model, image[None], **options)(torch.from_numpy(coalitions)[None])[0].double()
    target = int(want[-1].argmax())
    game = integration.ShapkernGame(model, image, coalitions_per_call=7, **options)  # 7: several calls
    assert game.n_players == players and game.target == target
    assert game.evaluations == 2  # v(∅) and v(N), for the target and the normalization
    np.testing.assert_allclose(
        game(coalitions) + game.normalization_value, want[:, target], rtol=0, atol=1e-6
    )
    assert game.evaluations == 2 + len(coalitions)
    assert game.empty_value == pytest.approx(float(want[0, target]), abs=1e-6)
    assert game.full_value == pytest.approx(float(want[-1, target]), abs=1e-6)
    assert abs(game(coalitions[:1])[0]) < 1e-6  # normalized: v(∅) = 0
    # A fixed class, raw logits.
    other = (target + 1) % want.shape[1]
    raw = integration.ShapkernGame(model, image[None], target=other, normalize=False, **options)
    assert raw.normalization_value == 0 and raw.target == other
    np.testing.assert_allclose(raw(coalitions), want[:, other], rtol=0, atol=1e-6)


def test_shapley_vit_needs_no_normalization(integration):
    game = integration.ShapkernGame(shapley_vit9(), torch.randn(3, 24, 24))
    assert game.empty_value == 0.0 and not game.normalize  # soft voting: v(∅) = 0 by construction


@pytest.mark.parametrize("build", [vit9, shapley_vit9])
def test_shapiq_values_equal_shapkern_exact(sq, integration, build):
    model, image = build(), torch.randn(3, 24, 24)
    want = (
        shapkern.explain(model, image[None], method="exact", progress=False).values[0, :, 0].double().numpy()
    )
    game = integration.ShapkernGame(model, image)
    exact = sq.ExactComputer(game)("SV", order=1)
    np.testing.assert_allclose(exact.get_n_order_values(1), want, rtol=0, atol=1e-6)
    # A full budget (2^N) makes shapiq's regression estimators exact.
    for approximator in (
        sq.KernelSHAP(9, pairing_trick=True, random_state=0),
        sq.kADDSHAP(9, random_state=0),
    ):
        values = approximator.approximate(2**9, game)
        assert not values.estimated
        np.testing.assert_allclose(values.get_n_order_values(1), want, rtol=0, atol=1e-6)
    assert np.sum(want) == pytest.approx(game.full_value - game.empty_value, abs=1e-5)


def oracle_game(sq, model, image, target, mode):
    """The same game written independently as a plain ``shapiq.Game``: timm's own forward with a
    boolean key mask (tokens, docs/design.md "Numerics and testing") or with zeroed pixels."""
    prefix = model.num_prefix_tokens

    def logits(z: torch.Tensor) -> torch.Tensor:
        images = image[None].expand(len(z), -1, -1, -1)
        if mode == "input":  # 3x3 grid of 8x8 patches, absent ones zeroed
            keep = z.view(-1, 1, 3, 1, 3, 1).expand(-1, 1, 3, 8, 3, 8).reshape(-1, 1, 24, 24)
            return model(images * keep)
        keep = torch.cat([z.new_ones(len(z), prefix), z], 1)[:, None, None, :]
        return model.forward_head(model.forward_features(images, attn_mask=keep))

    class Oracle(sq.Game):
        def value_function(self, coalitions):
            with torch.no_grad():
                return logits(torch.from_numpy(coalitions.astype(bool)))[:, target].double().numpy()

    empty = float(Oracle(9, normalize=False).value_function(np.zeros((1, 9), bool))[0])
    return Oracle(9, normalization_value=empty)


@pytest.mark.parametrize("mode", [None, "input"])
def test_shapiq_approximators_match_the_same_game_written_for_shapiq(sq, integration, mode):
    """The issue's target: shapiq's estimates on ShapkernGame equal shapiq's own on the same game
    (same approximator, same random_state, budget below 2^N so they are estimates) to 1e-6."""
    model, image = vit9(), torch.randn(3, 24, 24)
    game = integration.ShapkernGame(model, image, mode=mode)
    oracle = oracle_game(sq, model, image, game.target, mode)
    assert game.normalization_value == pytest.approx(oracle.normalization_value, abs=1e-6)
    for build, order in (
        (lambda: sq.KernelSHAP(9, pairing_trick=True, random_state=3), 1),
        (lambda: sq.PermutationSamplingSV(9, random_state=3), 1),
        (lambda: sq.KernelSHAPIQ(9, index="k-SII", max_order=2, random_state=3), 2),
    ):
        ours, theirs = build().approximate(120, game), build().approximate(120, oracle)
        assert ours.estimated and theirs.estimated
        for k in range(1, order + 1):
            np.testing.assert_allclose(
                ours.get_n_order_values(k), theirs.get_n_order_values(k), rtol=0, atol=1e-6
            )


@pytest.mark.filterwarnings("ignore:Not all budget is required")  # 2048 > 2^9 coalitions
def test_readme_example(sq):
    model, image = vit9(), torch.randn(3, 24, 24)
    # --- docs/api.md, "Explaining" (verbatim) ---
    import shapiq

    from shapkern.integrations.shapiq import ShapkernGame

    game = ShapkernGame(model, image)  # one (C, H, W) image; target: the predicted class
    sv = shapiq.KernelSHAP(game.n_players, pairing_trick=True).approximate(2048, game)
    k_sii = shapiq.KernelSHAPIQ(game.n_players, index="k-SII", max_order=2).approximate(2048, game)
    # ---
    want = shapkern.explain(model, image[None], method="exact", progress=False).values[0, :, 0].numpy()
    np.testing.assert_allclose(sv.get_n_order_values(1), want, rtol=0, atol=1e-5)  # 2048 >= 2^9: exact
    assert k_sii.index == "k-SII" and k_sii.max_order == 2


def test_bad_inputs(integration):
    model = vit9()
    with pytest.raises(ValueError, match="build one game per image"):
        integration.ShapkernGame(model, torch.randn(2, 3, 24, 24))
    with pytest.raises(ValueError, match=r"image must be one \(C, H, W\)"):
        integration.ShapkernGame(model, torch.randn(24, 24))
    with pytest.raises(TypeError, match="image must be a .* tensor, got ndarray"):
        integration.ShapkernGame(model, np.zeros((3, 24, 24), np.float32))
    with pytest.raises(TypeError, match="target must be 'pred' or an int class index, got float"):
        integration.ShapkernGame(model, torch.randn(3, 24, 24), target=1.0)
    with pytest.raises(ValueError, match="target must be 'pred' or a class index"):
        integration.ShapkernGame(model, torch.randn(3, 24, 24), target="all")
    with pytest.raises(ValueError, match="target class 4 is out of range: the model has 4 classes"):
        integration.ShapkernGame(model, torch.randn(3, 24, 24), target=4)
    with pytest.raises(ValueError, match="coalitions_per_call must be a positive int"):
        integration.ShapkernGame(model, torch.randn(3, 24, 24), coalitions_per_call=0)
    with pytest.raises(ValueError, match="the model takes 3x24x24 images"):
        integration.ShapkernGame(model, torch.randn(3, 32, 32))


def test_missing_shapiq_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "shapiq", None)  # makes `import shapiq` raise ImportError
    monkeypatch.delitem(sys.modules, "shapkern.integrations.shapiq", raising=False)
    with pytest.raises(ImportError, match=r"pip install shapiq \(or pip install 'shapkern\[shapiq\]'\)"):
        importlib.import_module("shapkern.integrations.shapiq")
    import shapkern.integrations  # noqa: F401 - the package itself imports without shapiq
