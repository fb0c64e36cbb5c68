import functools

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from tiny_models import SMALL, VARIANTS, tiny_vit
from torch import nn

from shapkern import fused_coalition_forward, sample_coalitions
from shapkern.engine import PackedTokens, coalition_tokens


def key_masked_reference(model, images, coalitions, output="logits"):
    """timm's own forward with a boolean key mask over the full token sequence
    (docs/design.md, "Numerics and testing")."""
    batch, num, players = coalitions.shape
    prefix = model.num_prefix_tokens
    rows = coalitions.reshape(batch * num, players)
    keep = torch.cat([rows.new_ones(batch * num, prefix), rows], dim=1)
    feats = model.forward_features(images.repeat_interleave(num, 0), attn_mask=keep[:, None, None, :])
    if model.global_pool == "avg":
        weights = rows.unsqueeze(-1).to(feats.dtype)
        pooled = model.fc_norm((feats[:, prefix:] * weights).sum(1) / weights.sum(1).clamp(min=1))
        out = pooled if output == "pre_logits" else model.head(pooled)
    else:
        out = model.forward_head(feats, pre_logits=output == "pre_logits")
    return out.view(batch, num, -1)


def random_coalitions(batch, num, players, seed, *, allow_empty=True):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, num, players, generator=gen) < torch.rand(batch, num, 1, generator=gen)
    masks[:, 0] = True
    if allow_empty:
        masks[:, 1] = False
    else:
        masks[:, 1, 0] = True
    return masks


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("output", ["logits", "pre_logits"])
def test_engine_equals_key_masked_timm(name, output):
    model = tiny_vit(name)
    players = model.patch_embed.num_patches
    num = 3 + len(name) % 5
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, num, players, seed=len(name), allow_empty=model.num_prefix_tokens > 0)
    got = fused_coalition_forward(model, images, coalitions, output=output)
    want = key_masked_reference(model, images, coalitions, output=output)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cls_token", "cls_avg", "registers", "distilled", "layer_scale"])
def test_engine_gradients_equal_key_masked_timm(name):
    model = tiny_vit(name)
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 4, model.patch_embed.num_patches, seed=7)
    weights = torch.randn(2, 4, 5)
    grads = []
    for fn in (fused_coalition_forward, key_masked_reference):
        model.zero_grad()
        x = images.clone().requires_grad_()
        (fn(model, x, coalitions) * weights).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_full_coalition_equals_plain_forward_and_broadcast_masks():
    model = tiny_vit("registers")
    images = torch.randn(3, 3, 32, 32)
    full = torch.ones(2, model.patch_embed.num_patches, dtype=torch.bool)
    got = fused_coalition_forward(model, images, full)
    assert got.shape == (3, 2, 5)
    torch.testing.assert_close(got, model(images).unsqueeze(1).expand(3, 2, 5), rtol=1e-4, atol=1e-5)


def test_empty_coalition_keeps_only_prefix_tokens():
    model = tiny_vit("cls_token")
    images = torch.randn(2, 3, 32, 32)
    empty = torch.zeros(2, 1, 16, dtype=torch.bool)
    got = fused_coalition_forward(model, images, empty)
    # Only the class token, attending to itself: independent of the image.
    torch.testing.assert_close(got[0], got[1])
    want = key_masked_reference(model, images, empty)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_empty_coalition_without_prefix_pools_zeros():
    model = tiny_vit("no_prefix_avg")
    images = torch.randn(2, 3, 32, 32)
    got = fused_coalition_forward(model, images, torch.zeros(2, 1, 16, dtype=torch.bool))
    want = model.head(model.fc_norm(torch.zeros(1, 32)))
    torch.testing.assert_close(got, want.expand(2, 1, 5))


def test_patches_outside_coalition_have_no_influence():
    model = tiny_vit("cls_avg")
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 6, 16, seed=3)
    changed = images.clone()
    grid = coalitions[:, 2].view(2, 4, 4)
    pixel_kept = grid.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1)
    changed = torch.where(pixel_kept, images, 100 * torch.randn_like(images))
    a = fused_coalition_forward(model, images, coalitions[:, 2:3])
    b = fused_coalition_forward(model, changed, coalitions[:, 2:3])
    assert torch.equal(a, b)


@pytest.mark.parametrize("paired", [False, True])
def test_chunking_and_pairing_give_the_same_answer(paired):
    model = tiny_vit("cls_token")
    images = torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 10, 16, generator=torch.Generator().manual_seed(4))
    whole = fused_coalition_forward(model, images, coalitions)
    chunked = fused_coalition_forward(model, images, coalitions, chunk_rows=4, paired=paired)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"paired": True},
        {"paired": False, "chunk_rows": 4},
        {"blocks": "fused"},
        {"precision": "fp8"},
        {"mode": "input"},
    ],
    ids=["paired", "chunked", "fused", "fp8", "input"],
)
def test_every_path_runs_under_inference_mode(options):
    model = tiny_vit("cls_token")
    images = torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 8, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = fused_coalition_forward(model, images, coalitions, **options)
    with torch.inference_mode():
        got = fused_coalition_forward(model, images, coalitions, **options)
    torch.testing.assert_close(got, expected)


def test_chunked_backward_matches_single_pass():
    model = tiny_vit("cls_token")
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 6, 16, seed=5)
    grads = []
    for chunk_rows in (None, 4):
        model.zero_grad()
        x = images.clone().requires_grad_()
        fused_coalition_forward(model, x, coalitions, chunk_rows=chunk_rows).square().sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_compiled_blocks_match_plain_path_forward_and_backward():
    """blocks="compiled" (torch.compile of the blocks) computes what the plain path does, chunked too."""
    model = tiny_vit("layer_scale")
    images = torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 8, 16, generator=torch.Generator().manual_seed(6))
    results = []
    for blocks in ("plain", "compiled"):
        model.zero_grad()
        x = images.clone().requires_grad_()
        out = fused_coalition_forward(model, x, coalitions, paired=True, chunk_rows=8, blocks=blocks)
        out.square().sum().backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_row_activation_estimate_counts_kept_tokens():
    from shapkern.engine import adapter_for
    from shapkern.engine.forward import _row_activation_bytes

    model = tiny_vit("registers")  # 3 prefix tokens, 16 patches, D = 32, depth 2, fp32
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert _row_activation_bytes(adapter_for(model), cpu, paired=False) == 19 * 32 * 4 * 16
        assert _row_activation_bytes(adapter_for(model), cpu, paired=True) == 11 * 32 * 4 * 16
    assert _row_activation_bytes(adapter_for(model), cpu, paired=True) == 2 * 11 * 32 * 4 * 16  # every block


def test_tokens_output_is_packed_features():
    model = tiny_vit("registers")
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=6)
    packed = coalition_tokens(model, images, coalitions)
    assert isinstance(packed, PackedTokens) and packed.shape == (2, 3)
    keep = torch.cat([torch.ones(6, 3, dtype=torch.bool), coalitions.view(6, 16)], 1)
    feats = model.forward_features(images.repeat_interleave(3, 0), attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(packed.tokens, feats[keep], rtol=1e-4, atol=1e-5)
    assert packed.plan.cu_seqlens[-1].item() == packed.tokens.shape[0]


def test_train_mode_drop_path_per_coalition_matches_timm():
    # Rates linspace(0, 1) over 2 blocks: block 0 never drops, block 1 always does, so timm's
    # train-mode forward is deterministic and the packed path must drop exactly the same branches.
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, drop_path_rate=1.0).train()
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=8)
    got = fused_coalition_forward(model, images, coalitions)
    torch.testing.assert_close(got, key_masked_reference(model, images, coalitions), rtol=1e-4, atol=1e-5)


def test_train_mode_dropout_is_random_per_call():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, drop_rate=0.5, proj_drop_rate=0.5).train()
    images = torch.randn(1, 3, 32, 32)
    coalitions = random_coalitions(1, 2, 16, seed=9)
    assert not torch.equal(
        fused_coalition_forward(model, images, coalitions), fused_coalition_forward(model, images, coalitions)
    )


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.mark.parametrize(
    "model, match",
    [
        (TinyConvNet(), "TinyConvNet.*not a timm VisionTransformer"),
        (VisionTransformer(**SMALL, global_pool="max"), "VisionTransformer.*'max'"),
    ],
)
def test_unsupported_models_raise(model, match):
    with pytest.raises(NotImplementedError, match=match):
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="mode='input'"):
        fused_coalition_forward(model, torch.randn(1, 3, 32, 32), torch.ones(1, 2, 16, dtype=torch.bool))


@pytest.mark.parametrize("baseline", ["zeros", "mean"])
def test_input_mode_masks_pixels_for_any_model(baseline):
    torch.manual_seed(0)
    model = TinyConvNet()
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 5, 16, seed=10)
    got = fused_coalition_forward(model, images, coalitions, mode="input", baseline=baseline, chunk_rows=3)
    assert got.shape == (2, 5, 5)
    fill = (
        torch.zeros_like(images)
        if baseline == "zeros"
        else images.mean((2, 3), keepdim=True).expand_as(images)
    )
    for m in range(5):
        pixels = coalitions[:, m].view(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
        torch.testing.assert_close(got[:, m], model(torch.where(pixels, images, fill)), rtol=1e-5, atol=1e-6)


def test_input_mode_blur_baseline_is_a_smoothed_image():
    torch.manual_seed(0)
    model = nn.Flatten()
    images = torch.randn(1, 3, 32, 32)
    empty = torch.zeros(1, 1, 16, dtype=torch.bool)
    blurred = fused_coalition_forward(model, images, empty, mode="input", baseline="blur").view(1, 3, 32, 32)
    assert blurred.diff(dim=-1).abs().mean() < 0.2 * images.diff(dim=-1).abs().mean()
    torch.testing.assert_close(blurred.mean((2, 3)), images.mean((2, 3)), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="baseline"):
        fused_coalition_forward(model, images, empty, mode="input", baseline="noise")


def test_bad_inputs_raise():
    model = tiny_vit("cls_token")
    images = torch.randn(2, 3, 32, 32)
    ok = torch.ones(2, 3, 16, dtype=torch.bool)
    with pytest.raises(TypeError, match="bool"):
        fused_coalition_forward(model, images, ok.float())
    with pytest.raises(ValueError, match="N = 15 players.*16 patches"):
        fused_coalition_forward(model, images, ok[..., :15])
    with pytest.raises(ValueError, match="B = 2 images"):
        fused_coalition_forward(model, images, ok[:1])
    with pytest.raises(ValueError, match="M >= 1"):
        fused_coalition_forward(model, images, ok[:, :0])
    with pytest.raises(ValueError, match="NaN"):
        fused_coalition_forward(model, images.masked_fill(images > 2, float("nan")), ok)
    with pytest.raises(ValueError, match="output"):
        fused_coalition_forward(model, images, ok, output="probs")
    with pytest.raises(ValueError, match="mode"):
        fused_coalition_forward(model, images, ok, mode="pixels")
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_coalition_forward(model, images, ok, chunk_rows=0)
    with pytest.raises(ValueError, match="images must be"):
        fused_coalition_forward(model, images[0], ok)
    with pytest.raises(ValueError, match="not complements"):
        fused_coalition_forward(model, images, ok[:, :2], paired=True)


@pytest.mark.cuda
def test_devices_must_match():
    model = tiny_vit("cls_token")
    with pytest.raises(ValueError, match="model is on cpu"):
        fused_coalition_forward(
            model, torch.randn(1, 3, 32, 32, device="cuda"), torch.ones(1, 2, 16, dtype=torch.bool)
        )


def _flat_gradients(fn, model, images, coalitions, weights):
    model.zero_grad()
    x = images.clone().requires_grad_()
    out = fn(model, x, coalitions)
    (out.float() * weights).sum().backward()
    grads = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()]).double()
    return out.detach().double(), grads


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_engine_matches_fp32_key_masked_timm(dtype, compiled):
    """Triton attention on the GPU (head dim 64), plain and compiled blocks: logits and gradients
    against timm's fp32 key-masked forward, within 1e-4 (fp32) or 1e-2 (bf16) relative."""
    kwargs = {**SMALL, **VARIANTS["registers"], "embed_dim": 128, "num_heads": 2, "init_values": 0.1}
    torch.manual_seed(0)
    reference = VisionTransformer(**kwargs).eval().cuda()
    model = VisionTransformer(**kwargs).eval().cuda()
    model.load_state_dict(reference.state_dict())
    model.to(dtype)
    images = torch.randn(3, 3, 32, 32, device="cuda")
    coalitions = sample_coalitions(3, 8, 16, generator=torch.Generator().manual_seed(8)).cuda()
    weights = torch.randn(3, 8, 5, device="cuda")
    engine = functools.partial(
        fused_coalition_forward, paired=True, blocks="compiled" if compiled else "plain"
    )
    got = _flat_gradients(engine, model, images.to(dtype), coalitions, weights)
    want = _flat_gradients(key_masked_reference, reference, images, coalitions, weights)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    for g, w in zip(got, want, strict=False):
        assert ((g - w).norm() / w.norm()).item() < tolerance


def test_qk_norm_under_autocast_runs_in_one_dtype():
    model = tiny_vit("qk_norm")
    images = torch.randn(2, 3, 32, 32)
    coalitions = random_coalitions(2, 3, 16, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_coalition_forward(model, images, coalitions)
    want = key_masked_reference(model, images, coalitions)
    assert ((got.float() - want).norm() / want.norm()).item() < 5e-2


def test_pixel_masking_reads_the_outputs_of_any_model_kind():
    from types import SimpleNamespace

    from shapkern.engine import model_output

    t = torch.randn(2, 3)
    for out in (
        t,
        SimpleNamespace(logits=t),
        SimpleNamespace(image_embeds=t),
        SimpleNamespace(pooler_output=t),
    ):
        assert model_output(out) is t
    assert model_output((t, torch.randn(2, 5))) is t
    with pytest.raises(TypeError, match="pixel masking needs a model whose forward returns"):
        model_output({"last_hidden_state": t})
