"""The packed engine on Hugging Face transformers models (engine/adapters/hf_vit.py): random-weight small
configs (32 px images in 8 px patches, N = 16, width 32, 2 layers, 2 heads), against each model's own
forward with the tokens of absent patches removed from its embeddings' output."""

import copy
import subprocess
import sys

import pytest
import torch
from gradient_checks import assert_flat_close, assert_relative_close, outputs_and_gradients

from shapkern import explain, fused_coalition_forward, sample_coalitions

transformers = pytest.importorskip("transformers")

SMALL = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
VISION = {**SMALL, "intermediate_size": 64}
EMBEDDINGS = (
    "ViTEmbeddings",
    "DeiTEmbeddings",
    "Dinov2Embeddings",
    "CLIPVisionEmbeddings",
    "SiglipVisionEmbeddings",
)


def _build(cls: str, config: str, options: dict | None = None, **extra):
    """A builder of transformers.<cls>(<config>(**VISION, **extra, **overrides), **options); a config
    with a vision_config (CLIPConfig, SiglipConfig) gets those settings there."""

    def build(**overrides):
        config_cls, vision = getattr(transformers, config), {**VISION, **extra, **overrides}
        if "vision_config" in config_cls.sub_configs:
            settings = config_cls(vision_config=vision, num_labels=5)
        else:
            settings = config_cls(**vision, num_labels=5)
        return getattr(transformers, cls)(settings, **(options or {}))

    return build


DINOV2 = {"mlp_ratio": 2, "layerscale_value": 0.5}
# name -> (builder, prefix tokens P, whether the model pools the patch mean, which HF's own forward
# leaves undefined (NaN) on the empty coalition)
MODELS = {
    "vit_classifier": (_build("ViTForImageClassification", "ViTConfig"), 1, False),
    "vit_model_pooler": (_build("ViTModel", "ViTConfig"), 1, False),
    "vit_model": (_build("ViTModel", "ViTConfig", {"add_pooling_layer": False}), 1, False),
    "deit_classifier": (_build("DeiTForImageClassification", "DeiTConfig"), 2, False),
    "deit_teacher": (_build("DeiTForImageClassificationWithTeacher", "DeiTConfig"), 2, False),
    "deit_model": (_build("DeiTModel", "DeiTConfig"), 2, False),
    "dinov2_classifier": (_build("Dinov2ForImageClassification", "Dinov2Config", **DINOV2), 1, True),
    "dinov2_swiglu": (_build("Dinov2Model", "Dinov2Config", **DINOV2, use_swiglu_ffn=True), 1, False),
    "clip": (_build("CLIPVisionModel", "CLIPVisionConfig", hidden_act="quick_gelu"), 1, False),
    "clip_projection": (
        _build("CLIPVisionModelWithProjection", "CLIPVisionConfig", projection_dim=16),
        1,
        False,
    ),
    "clip_classifier": (_build("CLIPForImageClassification", "CLIPConfig"), 1, True),
    "siglip": (_build("SiglipVisionModel", "SiglipVisionConfig"), 0, True),
    "siglip_classifier": (_build("SiglipForImageClassification", "SiglipConfig"), 0, True),
}


def make_model(name: str, seed: int = 0, **overrides):
    """A seeded model in eval mode; ``overrides`` go to its (vision) config."""
    torch.manual_seed(seed)
    model = MODELS[name][0](**overrides).eval()
    with torch.no_grad():  # transformers zero-inits biases and unit-inits norms; make every parameter matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_output(out) -> torch.Tensor:
    """What the adapter returns from a forward's output: logits, the projected image embedding, or the
    pooled output (for ViTModel without a pooler the final-norm class token)."""
    for field in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, field, None)
        if value is not None:
            return value
    return out.last_hidden_state[:, 0]


def dropped_reference(model, images, coalitions, prefix):
    """The model's own forward on each (image, coalition), with the tokens of absent patches removed
    from its embeddings' output (after the position embedding), one row at a time: (B, M, K)."""
    embeddings = next(m for m in model.modules() if type(m).__name__ in EMBEDDINGS)
    batch, num, _ = coalitions.shape
    outs = []
    for b in range(batch):
        for m in range(num):
            keep = torch.cat([torch.ones(prefix, dtype=torch.bool), coalitions[b, m]])
            handle = embeddings.register_forward_hook(lambda module, args, out, keep=keep: out[:, keep])
            try:
                outs.append(hf_output(model(images[b : b + 1]))[0])
            finally:
                handle.remove()
    return torch.stack(outs).view(batch, num, -1)


def random_coalitions(batch, num, seed, *, empty):
    """Random coalitions (B, M, 16): the full one first, then the empty one (``empty``) or none empty."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, num, 16, generator=gen) < torch.rand(batch, num, 1, generator=gen)
    masks[:, 0] = True
    if empty:
        masks[:, 1] = False
    else:
        masks[..., 5] |= ~masks.any(-1)
    return masks


@pytest.mark.parametrize("name", list(MODELS))
def test_engine_equals_hf_forward_with_patches_dropped(name):
    """Outputs and gradients (to the images and every parameter) within 1e-5 relative, on coalitions
    including the full one, and the empty one where the model's own forward defines it."""
    model, (_, prefix, pools_mean) = make_model(name), MODELS[name]
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 5, seed=len(name), empty=not pools_mean)
    weights = torch.randn(2, 5, hf_output(model(images)).shape[-1])
    got = outputs_and_gradients(
        lambda x: fused_coalition_forward(model, x, coalitions), model, images, weights
    )
    want = outputs_and_gradients(
        lambda x: dropped_reference(model, x, coalitions, prefix), model, images, weights
    )
    assert_relative_close(got, want, 1e-5)


@pytest.mark.parametrize("name", ["dinov2_classifier", "clip_classifier", "siglip", "siglip_classifier"])
def test_empty_coalition_pools_zeros(name):
    """Where the model averages patches (or, SigLIP, attends over them), a coalition without patches
    pools zeros: the output depends on the prefix tokens only."""
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32)
    got = fused_coalition_forward(model, images, torch.zeros(2, 1, 16, dtype=torch.bool))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], got[1])
    if name == "siglip_classifier":
        torch.testing.assert_close(got[0, 0], model.classifier.bias)
    if name == "siglip":  # the probe's attention output is out_proj's bias, then the head's residual MLP
        head = model.head
        pooled = head.attention.out_proj.bias
        torch.testing.assert_close(got[0, 0], pooled + head.mlp(head.layernorm(pooled)))


@pytest.mark.parametrize("name", ["vit_classifier", "dinov2_classifier", "clip_projection", "siglip"])
def test_pre_logits_are_the_heads_input(name):
    model = make_model(name)
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, seed=1, empty=False)
    pre = fused_coalition_forward(model, images, coalitions, output="pre_logits")
    out = fused_coalition_forward(model, images, coalitions)
    head = {
        "vit_classifier": "classifier",
        "dinov2_classifier": "classifier",
        "clip_projection": "visual_projection",
    }
    torch.testing.assert_close(out, getattr(model, head[name])(pre) if name in head else pre)


def test_paired_chunked_and_compiled_paths_agree():
    model = make_model("dinov2_swiglu")
    images = torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 8, 16, generator=torch.Generator().manual_seed(2))
    plain = fused_coalition_forward(model, images, coalitions, blocks="plain", paired=False)
    for options in ({"paired": True, "chunk_rows": 4}, {"blocks": "compiled", "paired": True}):
        torch.testing.assert_close(fused_coalition_forward(model, images, coalitions, **options), plain)


def test_explain_runs_packed_and_is_efficient():
    """explain() on a transformers classifier picks the packed game; exact values sum to
    f(full) - f(empty) of the model's own forward."""
    model = make_model("vit_classifier")
    images = torch.randn(2, 3, 32, 32)
    attribution = explain(model, images, method="exact", players=16, progress=False)
    assert attribution.values.shape == (2, 16, 1)
    full = model(images).logits
    empty = dropped_reference(model, images, torch.zeros(2, 1, 16, dtype=torch.bool), prefix=1)[:, 0]
    target = full.argmax(-1, keepdim=True)
    want = full.gather(1, target) - empty.gather(1, target)
    torch.testing.assert_close(attribution.values.sum(1), want, rtol=1e-4, atol=1e-5)


def test_explain_needs_no_players_argument():
    model = make_model("vit_classifier")
    attribution = explain(model, torch.randn(1, 3, 32, 32), budget=64, progress=False, seed=0)
    assert attribution.values.shape == (1, 16, 1)


def test_pixel_mode_masks_pixels_of_a_transformers_classifier():
    model = make_model("vit_classifier")
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, seed=4, empty=True)
    got = fused_coalition_forward(model, images, coalitions, mode="input")
    for m in range(3):
        pixels = coalitions[:, m].view(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
        want = model(torch.where(pixels, images, torch.zeros_like(images))).logits
        torch.testing.assert_close(got[:, m], want, rtol=1e-5, atol=1e-6)


def test_train_mode_hidden_dropout_is_random_per_call():
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(
        transformers.ViTConfig(**VISION, num_labels=5, hidden_dropout_prob=0.5)
    ).train()
    images = torch.randn(1, 3, 32, 32)
    coalitions = random_coalitions(1, 2, seed=9, empty=False)
    first = fused_coalition_forward(model, images, coalitions)
    assert not torch.equal(first, fused_coalition_forward(model, images, coalitions))


@pytest.mark.parametrize(
    "name, settings, match",
    [
        ("vit_classifier", {"attention_probs_dropout_prob": 0.1}, "attention dropout in train mode"),
        ("clip", {"attention_dropout": 0.1}, "attention dropout in train mode"),
        ("dinov2_classifier", {"drop_path_rate": 0.1}, "drop path"),
    ],
)
def test_unsupported_train_mode_is_refused(name, settings, match):
    model = make_model(name, **settings).train()
    ones = torch.ones(1, 2, 16, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match=f"{match}.*mode='input'"):
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), ones)
    fused_coalition_forward(model.eval(), torch.randn(1, 3, 32, 32), ones)  # eval mode runs


def test_unsupported_models_and_sizes_are_refused():
    ones = torch.ones(1, 2, 16, dtype=torch.bool)
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION, vision_use_head=False))
    with pytest.raises(NotImplementedError, match="vision_use_head=False.*mode='input'"):
        fused_coalition_forward(siglip, torch.randn(1, 3, 32, 32), ones)
    masked = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**VISION, encoder_stride=8))
    with pytest.raises(NotImplementedError, match="ViTForMaskedImageModeling.*mode='input'"):
        fused_coalition_forward(masked, torch.randn(1, 3, 32, 32), ones)
    for name in ("vit_classifier", "dinov2_classifier", "siglip"):
        with pytest.raises(ValueError, match="takes 3x32x32 images.*got 3x48x48.*interpolate_pos_encoding"):
            fused_coalition_forward(make_model(name), torch.randn(1, 3, 48, 48), ones)
    with pytest.raises(ValueError, match="takes 3x32x32 images.*got 1x32x32"):
        fused_coalition_forward(make_model("clip"), torch.randn(1, 1, 32, 32), ones)


def test_other_module_layouts_are_refused():
    """transformers 4 names a ViT's layers vit.encoder.layer and their projections attention.attention.query
    etc.; a model laid out otherwise than transformers 5 gets a clear error, not an AttributeError."""
    ones = torch.ones(1, 2, 16, dtype=torch.bool)
    model = make_model("vit_classifier")
    model.vit.layers[1].attention = torch.nn.Identity()
    with pytest.raises(NotImplementedError, match="not a ViTLayer with q_proj.*transformers 5.*mode='input'"):
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), ones)
    model.vit.encoder = torch.nn.Module()
    model.vit.encoder.layer = model.vit.layers
    del model.vit.layers
    with pytest.raises(NotImplementedError, match="no embeddings/layernorm/layers.*transformers 5"):
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), ones)


def test_importing_shapkern_does_not_import_transformers():
    code = (
        "import sys, torch, shapkern\n"
        "from shapkern.engine import adapter_for\n"
        "try:\n"
        "    adapter_for(torch.nn.Linear(2, 2))\n"
        "except NotImplementedError as error:\n"
        "    assert 'Hugging Face' in str(error), error\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "name", ["vit_classifier", "deit_teacher", "dinov2_swiglu", "clip_projection", "siglip"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_engine_matches_fp32_reference(name, dtype):
    """Triton varlen attention (head dim 64) and bf16 autocast, plain and compiled blocks, against the
    model's own fp32 forward on the CPU: outputs and gradients within 1e-4 (fp32) or 2e-2 (bf16)."""
    reference = make_model(name, hidden_size=128, intermediate_size=256)
    cuda = copy.deepcopy(reference).cuda()
    images = torch.randn(3, 3, 32, 32)
    coalitions = sample_coalitions(3, 8, 16, generator=torch.Generator().manual_seed(8))
    weights = torch.randn(3, 8, hf_output(reference(images)).shape[-1])
    want = outputs_and_gradients(
        lambda x: dropped_reference(reference, x, coalitions, MODELS[name][1]), reference, images, weights
    )
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for blocks in ("plain", "compiled"):

        def engine(x, blocks=blocks):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return fused_coalition_forward(cuda, x, coalitions.cuda(), paired=True, blocks=blocks).float()

        got = outputs_and_gradients(engine, cuda, images.cuda(), weights.cuda())
        assert_flat_close(got, want, tolerance)
