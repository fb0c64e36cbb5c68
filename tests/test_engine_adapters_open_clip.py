"""The packed engine on open_clip image towers (engine/adapters/open_clip_vit.py): small random-weight
towers built by open_clip's own code (32 px images in 8 px patches, N = 16, width 32, 2 blocks, 2
heads; nothing downloaded), against each tower's own forward with the tokens of absent patches removed
where its patch dropout would remove them."""

import subprocess
import sys

import pytest
import torch
from gradient_checks import assert_flat_close, assert_relative_close, outputs_and_gradients

from shapkern import explain, fused_coalition_forward, sample_coalitions
from shapkern.games import PackedGame, model_game

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, _build_vision_tower  # noqa: E402
from open_clip.timm_model import TimmModel  # noqa: E402

SMALL = {"layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 2.0, "patch_size": 8, "image_size": 32}
# name -> (CLIPVisionCfg settings, build options, whether it pools the patch mean (the tower's own
# forward is then undefined on the empty coalition))
VARIANTS = {
    "token": ({}, {}, False),
    "quick_gelu_fp32_norm": ({}, {"quick_gelu": True, "cast_dtype": torch.bfloat16}, False),
    "layer_scale": ({"ls_init_value": 0.5}, {}, False),
    "avg": ({"pool_type": "avg"}, {}, True),
    "avg_final_ln": ({"pool_type": "avg", "final_ln_after_pool": True}, {}, True),
    "sincos_no_ln_pre": (
        {"pos_embed_type": "sin_cos_2d", "no_ln_pre": True, "output_tokens": True},
        {},
        False,
    ),
}


def make_tower(name: str = "token", seed: int = 0, **settings):
    """open_clip's VisionTransformer as _build_vision_tower builds it (embedding dim 16), seeded, eval."""
    torch.manual_seed(seed)
    cfg, options, _ = VARIANTS[name]
    tower = _build_vision_tower(16, CLIPVisionCfg(**{**SMALL, **cfg, **settings}), **options).eval()
    with torch.no_grad():  # make every parameter matter, the zero-initialized biases too
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tower


def tower_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # output_tokens=True: (pooled, tokens)


def dropped_reference(tower, images, coalitions, hook_module):
    """The tower's own forward on each (image, coalition), the tokens of absent patches removed from
    the output of ``hook_module`` (its patch dropout, right after the positional embedding): (B, M, K)."""
    batch, num, _ = coalitions.shape
    outs = []
    for b in range(batch):
        for m in range(num):
            keep = torch.cat([torch.ones(1, dtype=torch.bool), coalitions[b, m]])
            handle = hook_module.register_forward_hook(lambda module, args, out, keep=keep: out[:, keep])
            try:
                outs.append(tower_output(tower(images[b : b + 1]))[0])
            finally:
                handle.remove()
    return torch.stack(outs).view(batch, num, -1)


def random_coalitions(batch, num, players, seed, *, empty):
    """Random coalitions: the full one first, then the empty one (``empty``) or none empty."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, num, players, generator=gen) < torch.rand(batch, num, 1, generator=gen)
    masks[:, 0] = True
    if empty:
        masks[:, 1] = False
    else:
        masks[..., 0] |= ~masks.any(-1)
    return masks


def check_against_reference(tower, hook_module, images, coalitions):
    weights = torch.randn(*coalitions.shape[:2], tower_output(tower(images[:1])).shape[-1])
    got = outputs_and_gradients(
        lambda x: fused_coalition_forward(tower, x, coalitions), tower, images, weights
    )
    want = outputs_and_gradients(
        lambda x: dropped_reference(tower, x, coalitions, hook_module), tower, images, weights
    )
    assert_relative_close(got, want, 1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_engine_equals_open_clip_forward_with_patches_dropped(name):
    """Projected embeddings and gradients (to the images and every parameter) within 1e-5 relative."""
    tower = make_tower(name)
    coalitions = random_coalitions(2, 5, 16, seed=len(name), empty=not VARIANTS[name][2])
    check_against_reference(tower, tower.patch_dropout, torch.randn(2, 3, 32, 32), coalitions)


def test_model_visual_of_a_clip_model():
    torch.manual_seed(0)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = CLIP(16, CLIPVisionCfg(**SMALL), text).eval()
    coalitions = random_coalitions(2, 4, 16, seed=3, empty=True)
    check_against_reference(model.visual, model.visual.patch_dropout, torch.randn(2, 3, 32, 32), coalitions)
    pre = fused_coalition_forward(
        model.visual, torch.randn(1, 3, 32, 32), coalitions[:1], output="pre_logits"
    )
    assert pre.shape == (1, 4, 32)


@pytest.mark.parametrize("proj", ["linear", "none"])
def test_timm_towers_run_their_trunk_through_the_timm_adapter(proj):
    """A TimmModel tower (timm ViT-Ti/16 trunk at 224 px, N = 196, random weights): its trunk on the
    packed engine, then its head (a linear projection, or the trunk's own head when proj='none')."""
    torch.manual_seed(0)
    tower = TimmModel("vit_tiny_patch16_224", embed_dim=16, pool="avg", proj=proj).eval()
    images = torch.randn(1, 3, 224, 224)
    coalitions = random_coalitions(1, 3, 196, seed=5, empty=False)
    check_against_reference(tower, tower.trunk.patch_drop, images, coalitions)
    assert isinstance(model_game(tower, images), PackedGame)  # N from the trunk's patch embedding


def test_explain_runs_packed_and_is_efficient():
    """explain() on model.visual: exact values of the largest embedding coordinate sum to
    f(full) - f(empty) of the tower's own forward."""
    tower = make_tower()
    images = torch.randn(2, 3, 32, 32)
    attribution = explain(tower, images, method="exact", players=16, progress=False)
    full = tower(images)
    empty = dropped_reference(tower, images, torch.zeros(2, 1, 16, dtype=torch.bool), tower.patch_dropout)
    target = full.argmax(-1, keepdim=True)
    want = full.gather(1, target) - empty[:, 0].gather(1, target)
    torch.testing.assert_close(attribution.values.sum(1), want, rtol=1e-4, atol=1e-5)


def test_explain_needs_no_players_argument():
    attribution = explain(make_tower(), torch.randn(1, 3, 32, 32), budget=64, progress=False, seed=0)
    assert attribution.values.shape == (1, 16, 1)


def test_paired_chunked_and_compiled_paths_agree():
    tower = make_tower("layer_scale")
    images = torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 8, 16, generator=torch.Generator().manual_seed(2))
    plain = fused_coalition_forward(tower, images, coalitions, blocks="plain", paired=False)
    for options in ({"paired": True, "chunk_rows": 4}, {"blocks": "compiled", "paired": True}):
        torch.testing.assert_close(fused_coalition_forward(tower, images, coalitions, **options), plain)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4}, "attentional pooling"),
        ({"qk_norm": True}, "CustomResidualAttentionBlock"),
        ({"pool_type": "none"}, "pool_type 'none'"),
    ],
)
def test_unsupported_towers_are_refused(settings, match):
    tower = make_tower(**settings)
    with pytest.raises(NotImplementedError, match=f"{match}.*mode='input'"):
        fused_coalition_forward(tower, torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool))


def test_patch_dropout_in_train_mode_and_other_sizes_are_refused():
    ones = torch.ones(1, 2, 16, dtype=torch.bool)
    tower = make_tower(patch_dropout=0.5).train()
    with pytest.raises(NotImplementedError, match="patch dropout in train mode.*mode='input'"):
        fused_coalition_forward(tower, torch.randn(1, 3, 32, 32), ones)
    fused_coalition_forward(tower.eval(), torch.randn(1, 3, 32, 32), ones)  # eval mode runs
    with pytest.raises(ValueError, match="takes 32x32 images, got 48x48"):
        fused_coalition_forward(tower, torch.randn(1, 3, 48, 48), ones)


def test_timm_tower_with_an_unsupported_trunk_is_refused():
    tower = TimmModel("resnet18", embed_dim=16).eval()
    with pytest.raises(NotImplementedError, match="TimmModel.*its trunk: ResNet.*mode='input'"):
        fused_coalition_forward(tower, torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool))


def test_importing_shapkern_does_not_import_open_clip():
    code = (
        "import sys, torch, shapkern\n"
        "from shapkern.engine import adapter_for\n"
        "try:\n"
        "    adapter_for(torch.nn.Linear(2, 2))\n"
        "except NotImplementedError as error:\n"
        "    assert 'open_clip VisionTransformer' in str(error), error\n"
        "assert 'open_clip' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["token", "layer_scale", "avg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_engine_matches_fp32_reference(name, dtype):
    """Triton varlen attention (head dim 64) and bf16 autocast, plain and compiled blocks, against the
    tower's own fp32 forward on the CPU: outputs and gradients within 1e-4 (fp32) or 2e-2 (bf16)."""
    reference = make_tower(name, width=128, head_width=64)
    cuda = make_tower(name, width=128, head_width=64).cuda()
    images = torch.randn(3, 3, 32, 32)
    coalitions = sample_coalitions(3, 8, 16, generator=torch.Generator().manual_seed(8))
    weights = torch.randn(3, 8, 16)
    want = outputs_and_gradients(
        lambda x: dropped_reference(reference, x, coalitions, reference.patch_dropout),
        reference,
        images,
        weights,
    )
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for blocks in ("plain", "compiled"):

        def engine(x, blocks=blocks):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return fused_coalition_forward(cuda, x, coalitions.cuda(), paired=True, blocks=blocks).float()

        got = outputs_and_gradients(engine, cuda, images.cuda(), weights.cuda())
        assert_flat_close(got, want, tolerance)
