"""The self-explaining image-text model (models/image_text.py, models/text.py) and its explanations
through ``explain(model, images, texts=...)`` (explainers/image_text.py)."""

import pytest
import torch

from shapkern import explain, sample_coalitions
from shapkern.checkpoint import CheckpointError
from shapkern.data.captions import CONTEXT_LENGTH, WORDS
from shapkern.games import SelfExplainingImageText, image_text_game
from shapkern.models import PAD, UNK, ShapleyCLIP, TextEncoder

VOCAB = [PAD, UNK, *WORDS]
TEXTS = ["red circle", "blue square left of red circle", "green cross top left"]


def make_model(depth=2, seed=0, **kw):
    torch.manual_seed(seed)
    model = ShapleyCLIP(
        "vit_tiny_patch16_224", 8, VOCAB, CONTEXT_LENGTH, img_size=32, patch_size=8, depth=depth,
        embed_dim=16, num_heads=2, **kw,
    )  # fmt: skip
    with torch.no_grad():  # a head large enough that the game is far from additive
        model.image.head.weight.normal_(0, 0.3)
    return model.eval()


def test_the_image_embedding_is_the_sum_of_phi_and_coalitions_run_its_own_game():
    model = make_model()
    assert isinstance(model, SelfExplainingImageText)
    images = torch.randn(3, 3, 32, 32)
    coalitions = sample_coalitions(3, 4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(images, TEXTS, coalitions, paired=True)
        alone = model(images)
        values = model.coalition_forward(images)(coalitions)
    assert out.phi.shape == (3, 16, 8) and out.text.shape == (3, 8) and out.bias is None
    assert torch.allclose(out.image, out.phi.sum(1), atol=1e-6)
    assert torch.allclose(out.image, alone.image, atol=1e-5) and torch.allclose(out.values, values, atol=1e-5)
    assert torch.allclose(out.text.norm(dim=-1), torch.ones(3))
    cosine = out.scale * torch.nn.functional.normalize(out.image, dim=-1) @ out.text.T  # CLIP's
    assert torch.allclose(out.similarity(), cosine, atol=1e-6)
    per_coalition = out.scale * out.values / out.image.norm(dim=-1).view(3, 1, 1) @ out.text.T
    assert torch.allclose(out.similarity(out.values), per_coalition, atol=1e-6)  # the game's values


def test_self_explanations_sum_to_the_similarity_and_its_game_is_its_own_value_function():
    model = make_model(contrastive="sigmoid")
    images = torch.randn(2, 3, 32, 32)
    att = explain(model, images, texts=TEXTS, target="all", progress=False)
    with torch.no_grad():
        sims = model(images, TEXTS).similarity()
    assert att.method == "self" and att.values.shape == (2, 16, 3)
    assert torch.allclose(att.full, sims, atol=1e-5) and torch.allclose(att.base, model.bias.expand(2, 3))
    assert att.efficiency_gap().abs().max() < 1e-4
    game = image_text_game(model, images, TEXTS)
    full = torch.ones(2, 1, 16, dtype=torch.bool)
    assert torch.allclose(game(full)[:, 0], sims, atol=1e-5)
    assert torch.allclose(game(~full)[:, 0], model.bias.expand(2, 3))  # f(∅) = 0: the bias alone
    pred = explain(model, images, texts=TEXTS, progress=False)
    assert torch.equal(pred.target[:, 0], sims.argmax(-1))


def test_phi_equals_the_exact_shapley_values_of_an_additive_model_and_differs_otherwise():
    """Without blocks, Φ(x_S)_n = Φ(x)_n: the similarity game is additive and Φ·e_t is exactly its
    Shapley value (all 2^16 coalitions); with attention it is not, and exact values show it."""
    images = torch.randn(2, 3, 32, 32)
    additive = make_model(depth=0)
    phi = explain(additive, images, texts=TEXTS, target="all", progress=False).values
    exact = explain(additive, images, texts=TEXTS, method="exact", target="all", progress=False).values
    assert torch.allclose(phi, exact, atol=1e-5)
    mixing = make_model(depth=2)
    phi = explain(mixing, images, texts=TEXTS, target="all", progress=False).values
    exact = explain(mixing, images, texts=TEXTS, method="exact", target="all", progress=False).values
    assert (phi - exact).norm() > 1e-3 * exact.norm()  # random weights: nearly additive, not exactly


def test_texts_as_embeddings_tokens_or_strings_agree():
    model = make_model()
    images = torch.randn(1, 3, 32, 32)
    tokens = model.tokenizer(TEXTS)
    with torch.no_grad():
        embeddings = model.encode_text(tokens)
    by = [
        explain(model, images, texts=t, target="all", progress=False).values
        for t in (TEXTS, tokens, embeddings)
    ]
    assert torch.allclose(by[0], by[1]) and torch.allclose(by[0], by[2], atol=1e-6)


def test_checkpoint_state_rebuilds_the_model():
    model = make_model()
    state = {"arch": model.arch, "model": model.state_dict()}
    rebuilt = ShapleyCLIP.from_state(state)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images, TEXTS).similarity(), model(images, TEXTS).similarity())
    with pytest.raises(CheckpointError, match="image-text"):
        ShapleyCLIP.from_state({"arch": {"backbone": "x"}, "model": {}})


def test_bad_inputs_are_clear_errors():
    encoder = TextEncoder(10, 8, 4)
    with pytest.raises(ValueError, match="at least one token"):
        encoder(torch.tensor([[1, 2, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="int64"):
        encoder(torch.zeros(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="contrastive"):
        make_model(contrastive="hinge")
    model = make_model()
    with pytest.raises(ValueError, match="ShapleyCLIP"):
        explain(torch.nn.Linear(3, 3), torch.randn(1, 3, 32, 32), texts=TEXTS, method="self")
    with pytest.raises(ValueError, match="own game"):
        explain(model, torch.randn(1, 3, 32, 32), texts=TEXTS, mode="input")


def test_heatmaps_per_text_and_checkpoints_of_either_task(tmp_path):
    from shapkern.explainers import save_text_heatmaps
    from shapkern.models import ShapleyViT, self_explaining_from_state

    model = make_model()
    images = torch.randn(2, 3, 32, 32)
    att = explain(model, images, texts=TEXTS, target="all", progress=False)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    save_text_heatmaps(images, att, TEXTS, paths, grid=(4, 4))
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="target='all'"):
        save_text_heatmaps(images, att, TEXTS[:2], paths)
    rebuilt = self_explaining_from_state({"arch": model.arch, "model": model.state_dict()})
    assert isinstance(rebuilt, ShapleyCLIP)
    vit = ShapleyViT("vit_tiny_patch16_224", 3, img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2)
    assert isinstance(self_explaining_from_state({"arch": vit.arch, "model": vit.state_dict()}), ShapleyViT)
