"""benchmarks/families.py and the family-aware methods of benchmarks/baselines.py: every alternative
equals the oracle (the model's own forward with the absent patches removed) on each family."""

import pytest
import torch
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from benchmarks import baselines, families
from shapkern import sample_coalitions

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
EVA02 = {
    "qkv_fused": False,
    "mlp_ratio": 4 * 2 / 3,
    "swiglu_mlp": True,
    "scale_mlp": True,
    "use_rot_pos_emb": True,
}
MODELS = {  # name -> (class, config): the variants whose layouts differ for the alternatives
    "vit_token": (VisionTransformer, {}),
    "vit_avg_registers": (VisionTransformer, {"global_pool": "avg", "reg_tokens": 2, "class_token": False}),
    "siglip_map": (VisionTransformer, {"global_pool": "map", "class_token": False}),
    "vit_map_class_token": (VisionTransformer, {"global_pool": "map", "reg_tokens": 1}),
    "eva02_avg": (Eva, {**EVA02, "ref_feat_shape": (2, 2)}),
    "eva02_clip_token": (Eva, {**EVA02, "global_pool": "token"}),
    "rope_mixed": (
        Eva,
        {"attn_type": "rope", "use_rot_pos_emb": True, "rope_type": "mixed", "global_pool": "token"},
    ),
    "pe_map": (
        Eva,
        {"attn_type": "rope", "use_rot_pos_emb": True, "global_pool": "map", "attn_pool_num_heads": 2},
    ),
    "beit_both_biases": (
        Beit,
        {"use_rel_pos_bias": True, "use_shared_rel_pos_bias": True, "init_values": 0.1},
    ),
    "beit_token": (Beit, {"use_abs_pos_emb": False, "use_rel_pos_bias": True, "global_pool": "token"}),
}


def make_model(name):
    cls, config = MODELS[name]
    torch.manual_seed(0)
    model = cls(**SMALL, **config).eval()
    with torch.no_grad():  # timm zero-inits biases, tables and heads; make every parameter matter
        for pname, p in model.named_parameters():
            p.add_((0.5 if "relative_position_bias_table" in pname else 0.05) * torch.randn_like(p))
    return model


def outputs_and_gradients(fn, model, images, coalitions):
    """fn's output and the gradients of a weighted sum of it to the images and every parameter."""
    model.zero_grad(set_to_none=True)
    images = images.clone().requires_grad_()
    out = fn(model, images, coalitions)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    grads = [images.grad] + [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]
    return out.detach(), grads


@pytest.mark.parametrize("name", list(MODELS))
def test_alternatives_equal_the_models_own_forward_on_kept_tokens(name):
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(1))
    want, want_grads = outputs_and_gradients(families.dropped_reference, model, images, coalitions)
    methods = {"key mask, SDPA", "pairs + dense mask, SDPA", "shapkern engine"}
    ran = []
    for method in sorted(methods):
        if baselines.unavailable_reason(method, "cpu", model):
            continue
        got, grads = outputs_and_gradients(baselines.METHODS[method].fn, model, images, coalitions)
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-5, msg=lambda m, method=method: f"{method}: {m}"
        )
        for got_grad, want_grad in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)
        ran.append(method)
    assert ran == sorted(methods - ({"pairs + dense mask, SDPA"} if name.startswith("beit") else set()))


@pytest.mark.parametrize("name", ["vit_token", "siglip_map", "eva02_avg", "pe_map", "beit_both_biases"])
def test_the_oracle_is_the_model_itself_on_the_full_coalition(name):
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32)
    full = torch.ones(2, 1, 16, dtype=torch.bool)
    torch.testing.assert_close(families.dropped_reference(model, images, full), model(images).unsqueeze(1))
    half = full.clone()
    half[..., ::2] = False
    assert not torch.allclose(families.dropped_reference(model, images, half), model(images).unsqueeze(1))


def test_the_oracle_refuses_a_latent_pool_over_no_token():
    model = make_model("siglip_map")
    with pytest.raises(ValueError, match="latent attention pool over no token"):
        families.dropped_reference(model, torch.randn(1, 3, 32, 32), torch.zeros(1, 1, 16, dtype=torch.bool))
    # With a class token in the pool's view the empty coalition has a value.
    model = make_model("pe_map")
    assert torch.isfinite(
        families.dropped_reference(model, torch.randn(1, 3, 32, 32), torch.zeros(1, 1, 16, dtype=torch.bool))
    ).all()


def test_unavailable_methods_name_the_family_reason(monkeypatch):
    """What a GPU would run per family: the engine's block paths per adapter, pairs not under Beit's
    bias table, FlexAttention only on timm's ViT Block, torch's varlen_attn not with a score bias."""
    monkeypatch.setattr(baselines, "_device_unavailable", lambda method, device: None)
    reasons = {
        name: {m: baselines.unavailable_reason(m, "cuda", make_model(name)) for m in baselines.METHODS}
        for name in ("vit_token", "siglip_map", "eva02_avg", "beit_both_biases")
    }
    assert not any(reasons["vit_token"].values()) and not any(reasons["siglip_map"].values())
    eva, beit = reasons["eva02_avg"], reasons["beit_both_biases"]
    for path in ("fused kernels", "fp8"):
        assert "blocks ('plain', 'compiled')" in eva[f"shapkern engine, {path}"]
        assert "blocks ('plain', 'compiled')" in beit[f"shapkern engine, {path}"]
    assert (
        "EvaBlock" in eva["pairs, FlexAttention"] and "timm.models.beit.Block" in beit["pairs, FlexAttention"]
    )
    assert "relative position bias" in beit["pairs + dense mask, SDPA"]
    assert "relative position bias" in beit["pairs + dense mask, torch.compile"]
    assert "score bias" in beit["packed, torch varlen_attn"]
    unavailable = {name: sorted(m for m, why in r.items() if why) for name, r in reasons.items()}
    assert unavailable["eva02_avg"] == sorted(
        ["shapkern engine, fused kernels", "shapkern engine, fp8", "pairs, FlexAttention"]
    )
    assert len(unavailable["beit_both_biases"]) == 6


def test_packed_flops_count_every_linear_of_the_blocks():
    coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(0))
    kept = coalitions.sum(-1).double() + 1
    vit = make_model("vit_token")  # qkv, proj, fc1, fc2 at MLP ratio 4: 24 D² per token
    dim, depth = 32, 2
    want = float((depth * (24 * dim**2 * kept + 4 * dim * kept**2)).sum())
    assert baselines.packed_flops(vit, coalitions) == pytest.approx(want)
    eva = make_model("eva02_avg")  # q, k, v, proj; SwiGLU: fc1_g, fc1_x, fc2 at hidden 4·2/3 D
    hidden = int(dim * 4 * 2 / 3)
    per_token = 2 * (4 * dim**2 + 3 * dim * hidden)
    want = float((depth * (per_token * kept + 4 * dim * kept**2)).sum())
    assert baselines.packed_flops(eva, coalitions) == pytest.approx(want)


def test_family_refuses_other_models():
    with pytest.raises(ValueError, match="not Linear"):
        families.family(torch.nn.Linear(2, 2))


def test_pair_features_keep_the_training_step_layout():
    """pair_features (the ShapleyViT training-step benchmark's rows): [prefix of 2i, prefix of 2i+1,
    N patches], each coalition's tokens as the model computes them on that coalition alone."""
    model = make_model("vit_token")
    images = torch.randn(1, 3, 32, 32)
    coalitions = sample_coalitions(1, 2, 16, generator=torch.Generator().manual_seed(2))
    rows = baselines.pair_features(model, images, coalitions)
    assert rows.shape == (1, 2 + 16, 32)
    for index, prefix in ((0, 0), (1, 1)):
        patches = coalitions[0, index].nonzero().view(-1)
        with families.kept_patches(model, patches):
            want = model.forward_features(images)[0]
        got = torch.cat([rows[0, prefix : prefix + 1], rows[0, 2 + patches]])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
