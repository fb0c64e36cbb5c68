"""The image-text game (games/image_text.py, engine/adapters/image_text.py) on random-weight dual
encoders built from small configs (32 px images in 8 px patches, N = 16; nothing downloaded): every
value equals the model's own similarity computation on the image with the tokens of absent patches
removed (by a hook after the positional embedding), one coalition at a time."""

import pytest
import torch
import torch.nn.functional as F

from shapkern import explain
from shapkern.games import ImageTextGame, image_text_game

VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 99}
TEXT |= {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def perturbed(model, seed=0):
    """The model in eval mode with every parameter moved, so zero-initialised biases matter too."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def coalitions(batch=2, num=4, players=16, seed=0):
    """The full coalition, then random ones (none empty: the towers' own mean pools need a token)."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, num, players, generator=gen) < 0.5
    masks[:, 0] = True
    masks[..., 0] |= ~masks.any(-1)
    return masks


def dropped(module, keep_prefix: int):
    """A forward hook dropping, from the output (1, P + N, D) of ``module``, the absent patches' tokens."""
    state = {}

    def hook(_, __, out):
        keep = torch.cat([torch.ones(keep_prefix, dtype=torch.bool), state["coalition"]])
        return out[:, keep]

    return module.register_forward_hook(hook), state


def brute_force(similarity, module, prefix, images, masks):
    """similarity(image (1, C, H, W)) -> (1, K) with the tokens outside each coalition dropped: (B, M, K)."""
    handle, state = dropped(module, prefix)
    try:
        rows = []
        for b in range(masks.shape[0]):
            for m in range(masks.shape[1]):
                state["coalition"] = masks[b, m]
                rows.append(similarity(images[b : b + 1])[0])
    finally:
        handle.remove()
    return torch.stack(rows).view(*masks.shape[:2], -1)


def test_open_clip_game_equals_its_own_logits_with_patches_dropped():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, mlp_ratio=2.0, patch_size=8, image_size=32)
    model = perturbed(CLIP(16, vision, CLIPTextCfg(context_length=12, width=32, heads=2, layers=1)))
    images, masks = torch.randn(2, 3, 32, 32), coalitions()
    texts = ["a red circle", "a dog", "two cats on a mat"]
    tokens = open_clip.tokenize(texts, context_length=12)
    game = image_text_game(model, images, texts)  # strings: open_clip's own tokenizer, offline
    with torch.no_grad():
        want = brute_force(
            lambda x: model.get_logits(x, tokens)[0], model.visual.patch_dropout, 1, images, masks
        )
        assert torch.allclose(game(masks), want, rtol=1e-5, atol=1e-5)
    att = explain(model, images, texts=texts, method="exact", target="all", progress=False)
    assert att.values.shape == (2, 16, 3)
    assert torch.allclose(att.full, want[:, 0], atol=1e-4)
    assert att.efficiency_gap().abs().max() < 1e-4


@pytest.mark.parametrize("family", ["CLIP", "Siglip"])
def test_hugging_face_game_equals_its_own_logits_with_patches_dropped(family):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{family}Config")(
        vision_config={**VISION, "intermediate_size": 64},
        text_config={**TEXT, "intermediate_size": 64, "max_position_embeddings": 8},
        **({"projection_dim": 16} if family == "CLIP" else {}),
    )
    model = perturbed(getattr(transformers, f"{family}Model")(config))
    images, masks = torch.randn(2, 3, 32, 32), coalitions()
    ids = torch.randint(1, 99, (3, 8), generator=torch.Generator().manual_seed(1))
    embeddings = next(
        m for m in model.vision_model.modules() if type(m).__name__.endswith("VisionEmbeddings")
    )
    prefix = 1 if family == "CLIP" else 0
    with torch.no_grad():
        game = image_text_game(model, images, ids)  # token ids: the model's text tower
        want = brute_force(
            lambda x: model(input_ids=ids, pixel_values=x).logits_per_image, embeddings, prefix, images, masks
        )
        assert torch.allclose(game(masks), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokenizer"):
        image_text_game(model, images, ["a dog"])  # its tokenizer is a file: not built offline
    texts = image_text_game(model, images, ["a b", "c"], tokenizer=lambda t: {"input_ids": ids[: len(t)]})
    assert texts.text.shape[0] == 2


def test_a_timm_tower_with_text_embeddings_is_the_cosine_game():
    timm = pytest.importorskip("timm")
    tower = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=16
    ).eval()
    perturbed(tower)
    images, masks = torch.randn(2, 3, 32, 32), coalitions()
    text = torch.randn(5, 16)
    game = image_text_game(tower, images, text)
    assert isinstance(game, ImageTextGame)

    def cosine(x):
        return F.normalize(tower(x), dim=-1) @ F.normalize(text, dim=-1).T

    with torch.no_grad():
        assert torch.allclose(game(masks), brute_force(cosine, tower.pos_drop, 1, images, masks), atol=1e-5)
    att = explain(tower, images, texts=text, method="kernel", budget=64, target=3, seed=0, progress=False)
    assert att.values.shape == (2, 16, 1) and att.target.tolist() == [[3], [3]]
    with pytest.raises(ValueError, match="embeddings"):
        image_text_game(tower, images, ["a dog"])
    with pytest.raises(ValueError, match="dimensions"):
        image_text_game(tower, images, torch.randn(2, 7))(masks)


def test_explain_without_texts_is_unchanged():
    timm = pytest.importorskip("timm")
    tower = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=4
    ).eval()
    images = torch.randn(1, 3, 32, 32)
    a = explain(tower, images, method="kernel", budget=64, seed=0, progress=False)
    b = explain(tower, images, method="kernel", budget=64, seed=0, progress=False, texts=None)
    assert torch.equal(a.values, b.values)
