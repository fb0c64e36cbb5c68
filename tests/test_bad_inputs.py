"""Every bad input is a clear ValueError/TypeError that names the argument, never a silent wrong
answer or a traceback from deep inside timm (CPU here; the CUDA variants carry the cuda marker)."""

import pytest
import torch
from tiny_models import SHAPLEY_SIZES, tiny_shapley_vit, tiny_vit

import shapkern
from shapkern import ShapleyLoss, ShapleyViT, explain, fused_coalition_forward, sample_coalitions
from shapkern.coalitions import CoalitionSampler
from shapkern.training import shapley_step


@pytest.fixture(scope="module")
def shapley_vit():
    return tiny_shapley_vit(3)


@pytest.fixture(scope="module")
def vit():
    return tiny_vit(sizes=SHAPLEY_SIZES | {"num_classes": 3})


def nan_images(batch=2):
    images = torch.randn(batch, 3, 16, 16)
    images[0, 0, 0, 0] = float("nan")
    return images


def test_non_finite_images_raise_on_every_path(shapley_vit, vit):
    coalitions = sample_coalitions(2, 4, 16)
    for call in (
        lambda x: shapley_vit(x),
        lambda x: shapley_vit.coalition_values(x, coalitions),
        lambda x: explain(shapley_vit, x, method="self"),
        lambda x: explain(vit, x, method="kernel", budget=16, progress=False),
        lambda x: fused_coalition_forward(vit, x, coalitions),
        lambda x: fused_coalition_forward(vit, x, coalitions, mode="input"),
    ):
        with pytest.raises(ValueError, match="NaN or infinite"):
            call(nan_images())
        with pytest.raises(ValueError, match="NaN or infinite"):
            call(torch.full((2, 3, 16, 16), float("inf")))


def test_an_empty_batch_gives_empty_results(shapley_vit, vit):
    empty = torch.zeros(0, 3, 16, 16)
    coalitions = torch.ones(0, 4, 16, dtype=torch.bool)
    assert fused_coalition_forward(vit, empty, coalitions).shape == (0, 4, 3)
    assert fused_coalition_forward(vit, empty, coalitions, paired=False, mode="input").shape == (0, 4, 3)
    out = shapley_vit(empty, coalitions)
    assert out.phi.shape == (0, 16, 3) and out.logits.shape == (0, 3) and out.values.shape == (0, 4, 3)
    for method in ("kernel", "leverage", "bayes", "exact", "permutation", "self"):
        budget = None if method == "exact" else 64  # exact refuses a budget below 2^N
        att = explain(
            shapley_vit if method == "self" else vit, empty, method=method, budget=budget, progress=False
        )
        assert att.values.shape[:2] == (0, 16), method


def test_engine_errors_name_what_to_fix(vit):
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="even number of coalitions M.*M = 3"):
        fused_coalition_forward(vit, images, sample_coalitions(2, 4, 16)[:, :3], paired=True)
    with pytest.raises(ValueError, match=r"takes 3x16x16 images .*got 3x32x32"):
        fused_coalition_forward(vit, torch.randn(2, 3, 32, 32), sample_coalitions(2, 4, 32 * 32 // 16))
    with pytest.raises(
        ValueError, match=r"images are torch.float64 but the model's parameters are torch.float32"
    ):
        fused_coalition_forward(vit, images.double(), sample_coalitions(2, 4, 16))
    with pytest.raises(TypeError, match="images must be a"):
        fused_coalition_forward(vit, images.numpy(), sample_coalitions(2, 4, 16))


def test_shapley_loss_errors_name_what_to_fix(shapley_vit, vit):
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    loss, coalitions = ShapleyLoss(), sample_coalitions(2, 4, 16)
    with pytest.raises(ValueError, match=r"coalitions must be \(B, M, N\) = \(2, M, 16\)"):
        shapley_step(shapley_vit, loss, images, labels, sample_coalitions(2, 4, 9))
    with pytest.raises(ValueError, match="targets must lie in 0..2"):
        shapley_step(shapley_vit, loss, images, torch.tensor([0, 3]), coalitions)
    with pytest.raises(ValueError, match="targets must be int64"):
        shapley_step(shapley_vit, loss, images, torch.tensor([0.0, 1.0]), coalitions)
    with pytest.raises(TypeError, match="needs a self-explaining model .*VisionTransformer"):
        shapley_step(vit, loss, images, labels, coalitions)
    for kwargs, message in (
        ({"lam": float("nan")}, "lam must be a finite number"),
        ({"mu": -1.0}, "mu must be a finite number >= 0"),
        ({"mask_loss": "mse"}, "mask_loss must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            ShapleyLoss(**kwargs)
    for kwargs, message in (  # the coalitions are the sampler's
        ({"sampler": "bogus"}, "sampler must be one of"),
        ({"num": 3}, "even when paired"),
    ):
        with pytest.raises(ValueError, match=message):
            CoalitionSampler(**kwargs)


def test_sampler_device_must_match_its_generator():
    with pytest.raises(ValueError, match="device='meta' but the generator is on cpu"):
        sample_coalitions(1, 2, 4, device="meta", generator=torch.Generator())
    with pytest.raises(ValueError, match="generator is on cpu"):
        shapkern.sample_permutations(1, 2, 4, device="meta", generator=torch.Generator())
    assert sample_coalitions(1, 2, 4, device="cpu", generator=torch.Generator()).device.type == "cpu"


def test_shapley_vit_rejects_a_bad_number_of_classes():
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ShapleyViT("vit_tiny_patch16_224", 0, **SHAPLEY_SIZES)


@pytest.mark.cuda
def test_cuda_non_finite_images_raise_on_the_device(vit):
    model = vit.cuda()
    images = nan_images().cuda()
    with pytest.raises(ValueError, match="NaN or infinite"):  # explain checks once on the host
        explain(model, images, method="kernel", budget=16, progress=False)
    with pytest.raises(RuntimeError):  # the engine's hot path asserts on the device, no host sync
        fused_coalition_forward(model, images, sample_coalitions(2, 4, 16, device="cuda"))
        torch.cuda.synchronize()
