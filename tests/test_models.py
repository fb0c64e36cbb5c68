import pytest
import timm
import torch
from tiny_models import SHAPLEY_SIZES, tiny_shapley_vit

from shapkern.models import ShapleyViT

KW = SHAPLEY_SIZES | {"depth": 2, "embed_dim": 32}


def tiny(head="linear"):
    return tiny_shapley_vit(3, head, **KW)


def reference_values(model: ShapleyViT, images: torch.Tensor, coalitions: torch.Tensor) -> torch.Tensor:
    """Slow reference: one timm forward per coalition with a boolean key mask, then the head."""
    prefix = model.num_prefix_tokens
    out = []
    for b in range(images.shape[0]):
        rows = []
        for mask in coalitions[b]:
            keep = torch.cat([torch.ones(prefix, dtype=torch.bool), mask])
            attn_mask = keep[None, None, None, :]
            tokens = model.backbone.forward_features(images[b : b + 1], attn_mask=attn_mask)
            if model.head_block is not None:
                tokens = model.head_block(tokens, attn_mask=attn_mask)
            phi = model.head(model.head_norm(tokens[0, prefix:]))
            rows.append((phi * mask.unsqueeze(-1)).sum(0))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("head", ["linear", "block"])
def test_shapes_and_soft_voting(head):
    model = tiny(head)
    images = torch.randn(2, 3, 16, 16)
    phi, logits, values = model(images)
    assert values is None and phi.shape == (2, 16, 3) and logits.shape == (2, 3)
    torch.testing.assert_close(logits, phi.sum(1))


@pytest.mark.parametrize("head", ["linear", "block"])
def test_engine_values_equal_timm_masked_forward(head):
    model = tiny(head)
    images = torch.randn(2, 3, 16, 16)
    coalitions = torch.rand(2, 5, 16) < 0.5
    values = model.coalition_values(images, coalitions)
    torch.testing.assert_close(values, reference_values(model, images, coalitions), atol=1e-5, rtol=1e-4)


def test_coalition_values_in_chunks_equal_one_pass(monkeypatch):
    from shapkern import sample_coalitions
    from shapkern.engine import coalition_chunk_rows
    from shapkern.engine.chunking import CPU_MAX_CHUNK_ROWS

    model = tiny("block")
    images = torch.randn(3, 3, 16, 16)
    coalitions = sample_coalitions(3, 10, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model.coalition_values(images, coalitions, paired=True, chunk_rows=10**6)
        for rows in (1, 6, 9):  # 1 and 9 round to whole pairs per image
            chunked = model.coalition_values(images, coalitions, paired=True, chunk_rows=rows)
            torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
        shared = model.coalition_values(images, coalitions[0], chunk_rows=4)  # (M, N) for all images
        torch.testing.assert_close(shared, model.coalition_values(images, coalitions[:1].expand(3, -1, -1)))
    assert 2 <= coalition_chunk_rows(model.backbone, images, paired=True) <= CPU_MAX_CHUNK_ROWS
    passes = []  # the CPU default splits 3 x 200 rows into passes of at most 256 rows
    inner = model._coalition_head  # the Shapley head, once per pass: rows = the plan's sequences
    monkeypatch.setattr(
        model, "_coalition_head", lambda t, plan: passes.append(plan.row_image.shape[0]) or inner(t, plan)
    )
    with torch.no_grad():
        model.coalition_values(images, torch.rand(3, 200, 16) < 0.5)
    assert len(passes) == 3 and all(rows <= CPU_MAX_CHUNK_ROWS for rows in passes)
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        model.coalition_values(images, coalitions, chunk_rows=0)
    with pytest.raises(ValueError, match="at least one coalition"):
        model.coalition_values(images, coalitions[:, :0])


@pytest.mark.parametrize("head", ["linear", "block"])
def test_one_pass_matches_plain_forward_and_efficiency(head):
    model = tiny(head)
    images = torch.randn(3, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    from shapkern import sample_coalitions

    coalitions = sample_coalitions(3, 4, 16, generator=gen)
    phi = model(images).phi
    out = model.forward_coalitions(images, coalitions, paired=True)
    torch.testing.assert_close(out.phi, phi, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.values, model.coalition_values(images, coalitions), atol=1e-5, rtol=1e-4)
    ends = torch.stack([torch.zeros(16, dtype=torch.bool), torch.ones(16, dtype=torch.bool)])
    empty, full = model.coalition_values(images, ends).unbind(1)
    assert torch.count_nonzero(empty) == 0  # v(∅) = 0
    torch.testing.assert_close(phi.sum(1), full - empty, atol=1e-5, rtol=1e-4)  # Σ Φ = f(x) - v(∅)


def test_gradients_reach_params_and_images():
    model = tiny().train()
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    values = model.coalition_values(images, torch.rand(2, 4, 16) < 0.5)
    values.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.backbone.blocks.parameters())


def test_user_backbone_and_local_weights(tmp_path):
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KW)
    path = tmp_path / "w.pth"
    torch.save(backbone.state_dict(), path)
    model = ShapleyViT(backbone, 5)
    assert model.head.out_features == 5 and model.num_players == 16
    loaded = ShapleyViT("vit_tiny_patch16_224", 5, checkpoint=path, **KW)
    torch.testing.assert_close(loaded.backbone.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        ShapleyViT("vit_nonexistent_xyz", 3)
    with pytest.raises(ValueError, match="head must be"):
        ShapleyViT("vit_tiny_patch16_224", 3, head="mlp", **KW)
    with pytest.raises(NotImplementedError, match="not supported"):
        ShapleyViT(timm.create_model("resnet10t", pretrained=False), 3)
    other = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, **(KW | {"embed_dim": 48, "num_heads": 3})
    )
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(ValueError, match="does not fit"):
        ShapleyViT("vit_tiny_patch16_224", 3, checkpoint=path, **KW)
    with pytest.raises(FileNotFoundError):
        ShapleyViT("vit_tiny_patch16_224", 3, checkpoint=tmp_path / "missing.pth", **KW)


@pytest.mark.parametrize("head", ["linear", "block"])
def test_forward_and_coalition_values_run_under_inference_mode(head):
    model = tiny(head)
    images = torch.randn(2, 3, 16, 16)
    coalitions = torch.rand(2, 4, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        expected = model(images, coalitions), model.coalition_values(images, coalitions)
    with torch.inference_mode():
        got = model(images, coalitions), model.coalition_values(images, coalitions)
    for a, b in zip((*got[0], got[1]), (*expected[0], expected[1]), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "backbone",
    [
        {"name": "vit_base_patch16_siglip_224"},  # attention pool 'map': dropped, Φ reads the tokens
        {"name": "eva02_base_patch14_224", "patch_size": 4},  # rotary embedding, SwiGLU
    ],
    ids=["siglip", "eva02"],
)
def test_other_backbone_families_self_explain_with_one_value_function(backbone):
    options = {**KW, "patch_size": 4, **{k: v for k, v in backbone.items() if k != "name"}}
    torch.manual_seed(0)
    model = ShapleyViT(backbone["name"], 3, **options).eval()
    assert getattr(model.backbone, "attn_pool", None) is None
    images = torch.randn(2, 3, 16, 16)
    coalitions = torch.rand(2, 4, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    out = model(images, coalitions)
    torch.testing.assert_close(out.phi, model(images).phi, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.values, model.coalition_values(images, coalitions), atol=1e-5, rtol=1e-4)
    out.values.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
