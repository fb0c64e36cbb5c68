import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_shapley_vit

from shapkern import sample_coalitions
from shapkern.models import ShapleyOutput, ShapleyViT
from shapkern.training import ShapleyLoss, shapley_regression_loss, shapley_step
from shapkern.training.losses import SV_SCALES, default_grad_coalitions


def tiny():
    return tiny_shapley_vit(3, embed_dim=32).train()


def test_sv_loss_is_zero_at_the_shapley_values_of_an_additive_game():
    weights = torch.randn(4, 16, 3, dtype=torch.float64)  # v(S) = Σ_{n∈S} w_n: φ = w exactly
    coalitions = sample_coalitions(4, 32, 16, generator=torch.Generator().manual_seed(0))
    values = torch.bmm(coalitions.double(), weights)
    assert shapley_regression_loss(weights, values, coalitions) < 1e-20
    assert shapley_regression_loss(weights + 0.1 * torch.randn_like(weights), values, coalitions) > 1e-3


def test_stop_grad_keeps_gradients_from_the_target():
    phi = torch.randn(2, 16, 3, requires_grad=True)
    coalitions = torch.rand(2, 8, 16) < 0.5
    values = torch.randn(2, 8, 3, requires_grad=True)
    shapley_regression_loss(phi, values, coalitions, stop_grad=True).backward()
    assert values.grad is None and phi.grad is not None
    shapley_regression_loss(phi, values, coalitions, stop_grad=False).backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


def test_the_regression_loss_and_the_loss_share_the_default_stop_grad():
    """One default per option: ℓ_sv's gradient flows through its targets unless told otherwise."""
    phi = torch.randn(2, 16, 3, requires_grad=True)
    values = torch.randn(2, 8, 3, requires_grad=True)
    shapley_regression_loss(phi, values, torch.rand(2, 8, 16) < 0.5).backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    assert ShapleyLoss().stop_grad is False


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_through_the_model(stop_grad):
    model = tiny()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    coalitions = sample_coalitions(2, 4, 16)
    out = shapley_step(model, ShapleyLoss(mask_loss=None, stop_grad=stop_grad), images, labels, coalitions)
    (grad,) = torch.autograd.grad(out.total, out.values, allow_unused=True)
    assert (grad is None) == stop_grad


def reference_loss(model, images, labels, coalitions, lam, mu, mask_loss, graded=None, stop_grad=True):
    """Slow reference from timm's key-masked forward, one coalition at a time; ℓ_mask over the
    first ``graded`` coalitions (default all); ℓ_sv's gradient through its targets unless
    ``stop_grad``."""
    graded = coalitions.shape[1] if graded is None else graded
    prefix = model.num_prefix_tokens
    tokens = model.backbone.forward_features(images)
    phi = model.head(model.head_norm(tokens[:, prefix:]))
    logits = phi.sum(1)
    values = torch.zeros(*coalitions.shape[:2], 3)
    for b in range(images.shape[0]):
        for m, mask in enumerate(coalitions[b]):
            keep = torch.cat([torch.ones(prefix, dtype=torch.bool), mask])[None, None, None, :]
            masked = model.backbone.forward_features(images[b : b + 1], attn_mask=keep)
            values[b, m] = (model.head(model.head_norm(masked[0, prefix:])) * mask[:, None]).sum(0)
    cls = F.cross_entropy(logits, labels)

    sv = (
        sum(
            ((values[b, m] if not stop_grad else values[b, m].detach()) - phi[b][coalitions[b, m]].sum(0))
            .square()
            .sum()
            for b in range(images.shape[0])
            for m in range(coalitions.shape[1])
        )
        / coalitions.shape[:2].numel()
    )
    if mask_loss == "ce":
        mask = sum(F.cross_entropy(values[:, m], labels) for m in range(graded)) / graded
    else:
        target = logits.detach().softmax(-1)
        mask = (
            sum(
                (target * (target.log() - values[:, m].log_softmax(-1))).sum(-1).mean() for m in range(graded)
            )
            / graded
        )
    return cls + lam * sv + mu * mask


@pytest.mark.parametrize("mask_loss", ["ce", "kl"])
@pytest.mark.parametrize("grad_coalitions", [None, 4])
def test_loss_step_equals_slow_timm_reference(mask_loss, grad_coalitions):
    model = tiny()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(1))
    loss = ShapleyLoss(lam=0.7, mu=0.3, mask_loss=mask_loss, grad_coalitions=grad_coalitions, stop_grad=True)
    assert loss.graded(4) == (2 if grad_coalitions is None else 4)  # default: M/4, at least a pair
    out = shapley_step(model, loss, images, labels, coalitions)
    grads = torch.autograd.grad(out.total, list(model.parameters()))
    ref = reference_loss(model, images, labels, coalitions, 0.7, 0.3, mask_loss, loss.graded(4))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(out.total, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=False):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert set(out.components()) == {"loss", "cls", "sv", "mask"}


def test_loss_without_stop_grad_equals_the_reference():
    """The default, stop_grad=False: ℓ_sv's gradient flows through its targets v_x(S) as well, and
    every coalition carries gradients."""
    model = tiny().eval()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(2))
    loss = ShapleyLoss(lam=0.7, mu=0.3)
    assert not loss.stop_grad and loss.graded(4) == 4
    out = shapley_step(model, loss, images, labels, coalitions)
    grads = torch.autograd.grad(out.total, list(model.parameters()))
    ref = reference_loss(model, images, labels, coalitions, 0.7, 0.3, "kl", stop_grad=False)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(out.total, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_no_mask_loss_and_bad_arguments():
    model = tiny()
    loss = ShapleyLoss(mask_loss=None)
    out = shapley_step(model, loss, torch.randn(1, 3, 16, 16), torch.tensor([0]), sample_coalitions(1, 2, 16))
    torch.testing.assert_close(out.total, out.cls + loss.lam * out.sv)
    with pytest.raises(ValueError, match="mask_loss"):
        ShapleyLoss(mask_loss="mse")
    with pytest.raises(ValueError, match="even"):
        shapley_step(
            model, loss, torch.randn(1, 3, 16, 16), torch.tensor([0]), sample_coalitions(1, 4, 16)[:, :3]
        )


def _grads(model, loss, images, labels, coalitions):
    model.zero_grad()
    out = shapley_step(model, loss, images, labels, coalitions)
    out.total.backward()
    return out, [p.grad.clone() for p in model.parameters()]


def test_forward_only_coalitions_give_the_same_sv_loss_and_gradients():
    model = tiny().eval()  # no dropout: the two passes see the same model
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 2, 1])
    coalitions = sample_coalitions(3, 8, 16, generator=torch.Generator().manual_seed(4))
    options = {"mask_loss": None, "stop_grad": True}
    full, full_grads = _grads(model, ShapleyLoss(**options, grad_coalitions=8), images, labels, coalitions)
    assert full.values.shape == (3, 8, 3)
    for grad_coalitions in (4, 2):
        loss = ShapleyLoss(**options, grad_coalitions=grad_coalitions)
        part, part_grads = _grads(model, loss, images, labels, coalitions)
        assert part.values.shape == (3, grad_coalitions, 3)  # only these carried gradients
        torch.testing.assert_close(part.sv, full.sv, rtol=1e-5, atol=1e-7)  # ℓ_sv still over all 8
        for got, want in zip(part_grads, full_grads, strict=True):  # ℓ_sv's targets carry none anyway
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_forward_only_coalitions_take_the_mask_loss_over_the_graded_ones():
    model = tiny().eval()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 0])
    coalitions = sample_coalitions(2, 8, 16, generator=torch.Generator().manual_seed(5))
    options = {"mask_loss": "ce", "stop_grad": True}
    part = shapley_step(model, ShapleyLoss(grad_coalitions=2, **options), images, labels, coalitions)
    only = shapley_step(model, ShapleyLoss(**options), images, labels, coalitions[:, :2])
    torch.testing.assert_close(part.mask, only.mask, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="grad_coalitions must be"):
        ShapleyLoss(grad_coalitions=3).graded(8)
    with pytest.raises(ValueError, match="needs every coalition to carry gradients"):
        ShapleyLoss(grad_coalitions=2).graded(8)  # the default stop_grad=False
    with pytest.raises(ValueError, match="needs every coalition to carry gradients"):
        shapley_step(model, ShapleyLoss(grad_coalitions=2), images, labels, coalitions)


def test_relative_sv_loss_ignores_the_logit_scale():
    phi = torch.randn(4, 16, 3, dtype=torch.float64)
    coalitions = sample_coalitions(4, 8, 16, generator=torch.Generator().manual_seed(6))
    values = torch.bmm(coalitions.double(), phi) + torch.randn(4, 8, 3, dtype=torch.float64)
    logits = phi.sum(1)
    raw = shapley_regression_loss(phi, values, coalitions)
    assert shapley_regression_loss(1e3 * phi, 1e3 * values, coalitions) == pytest.approx(1e6 * float(raw))
    scaled = [
        shapley_regression_loss(c * phi, c * values, coalitions, sv_scale="relative", logits=c * logits)
        for c in (1e3, 1e4)
    ]
    error = (torch.bmm(coalitions.double(), phi) - values).square().sum(-1).mean(1)
    want = (error / logits.square().sum(-1)).mean()  # the +1 vanishes against large logits
    assert float(scaled[0]) == pytest.approx(float(want), rel=1e-3)
    assert float(scaled[1]) == pytest.approx(float(want), rel=1e-4)
    with pytest.raises(ValueError, match="sv_scale must be one of"):
        ShapleyLoss(sv_scale="log")


def test_default_grad_coalitions_is_a_quarter_in_whole_pairs():
    assert [default_grad_coalitions(m) for m in (2, 4, 8, 12, 32)] == [2, 2, 2, 2, 8]
    assert [default_grad_coalitions(m, paired=False) for m in (1, 3, 8, 13)] == [1, 1, 2, 3]
    assert ShapleyLoss(stop_grad=True).graded(16) == 4
    assert ShapleyLoss().graded(16) == 16  # without stop-gradient: all carry them


def test_fp8_targets_run_the_forward_only_coalitions_in_fp8():
    model = tiny().eval()
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 2, 1])
    coalitions = sample_coalitions(3, 8, 16, generator=torch.Generator().manual_seed(7))
    options = {"mask_loss": None, "stop_grad": True}
    loss = ShapleyLoss(**options, target_precision="fp8")
    out = shapley_step(model, loss, images, labels, coalitions)
    with torch.no_grad():
        rest = model.coalition_values(images, coalitions[:, 2:], paired=True, precision="fp8")
    want = shapley_regression_loss(out.phi, torch.cat([out.values.detach(), rest], 1), coalitions)
    torch.testing.assert_close(out.sv, want)
    same = shapley_step(model, ShapleyLoss(**options), images, labels, coalitions)
    assert float(out.sv) != float(same.sv)  # the six forward-only targets did run in e4m3
    assert float(out.sv) == pytest.approx(float(same.sv), rel=0.1)
    out.total.backward()  # the graded coalitions keep their gradients
    assert all(p.grad is not None for p in model.head.parameters())
    with pytest.raises(ValueError, match="all 8 coalitions carry gradients.*need stop_grad=True"):
        ShapleyLoss(stop_grad=True, grad_coalitions=8, target_precision="fp8").graded(8)
    with pytest.raises(ValueError, match="all coalitions carry gradients.*need stop_grad=True"):
        ShapleyLoss(target_precision="fp8")  # the default: no stop-gradient
    with pytest.raises(ValueError, match="precision must be one of"):
        ShapleyLoss(target_precision="fp16")


def test_sv_scale_normalisers_divide_each_images_error_by_a_stop_gradient_scale():
    """The ℓ_sv normalisers once defined by the train_sweeps benchmark's SweepLoss, as sv_scale options."""
    torch.manual_seed(0)
    model = ShapleyViT(
        "vit_tiny_patch16_224", 3, img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=1
    )
    images, targets = torch.randn(3, 3, 16, 16), torch.tensor([0, 2, 1])
    base = ShapleyLoss(0.0, 1.0, stop_grad=True, grad_coalitions=8)
    coalitions = sample_coalitions(3, 8, model.num_players, generator=torch.Generator().manual_seed(1))
    want = shapley_step(model, base, images, targets, coalitions)
    error = (want.values - torch.bmm(coalitions.float(), want.phi)).square().sum(-1).mean(1)
    phi = want.phi.detach()
    scales = {  # stop-gradient normalisers
        "player": phi.square().mean(1).sum(-1) + 1e-3,
        "centered": (phi - phi.mean(-1, keepdim=True)).square().mean(1).sum(-1) + 1e-3,
    }
    assert set(scales) == set(SV_SCALES) - {"raw", "relative"}
    for name, scale in scales.items():
        loss = ShapleyLoss(2.0, 1.0, sv_scale=name, stop_grad=True, grad_coalitions=8)
        got = shapley_step(model, loss, images, targets, coalitions)
        sv = (error / scale).mean()
        assert torch.allclose(got.sv, sv, rtol=1e-5) and torch.allclose(
            got.total, want.total + 2 * sv, rtol=1e-5
        )
        # The normaliser is a stop-gradient: ℓ_sv's gradient is the raw one divided per image.
        params = [p for p in model.parameters() if p.requires_grad]
        g_got = torch.autograd.grad(got.total, params)
        out = shapley_step(model, base, images, targets, coalitions)
        raw = (out.values.detach() - torch.bmm(coalitions.float(), out.phi)).square().sum(-1).mean(1)
        g_want = torch.autograd.grad(out.total + 2 * (raw / scale).mean(), params)
        for a, b in zip(g_got, g_want, strict=True):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7, (a - b).abs().max()
    with pytest.raises(ValueError, match="sv_scale must be one of"):
        ShapleyLoss(sv_scale="scale")
    with pytest.raises(ValueError, match="logits apply to sv_scale='relative' only"):
        shapley_regression_loss(phi, want.values, coalitions, sv_scale="player", logits=want.logits)


def test_the_loss_takes_outputs_and_calls_no_model():
    """A pure loss: the outputs of any self-explaining computation, the coalitions, and forward-only
    ℓ_sv targets only with the stop gradient."""
    phi = torch.randn(2, 4, 3, requires_grad=True)
    values = torch.randn(2, 2, 3, requires_grad=True)
    coalitions = sample_coalitions(2, 4, 4, generator=torch.Generator().manual_seed(8))
    outputs = ShapleyOutput(phi=phi, logits=phi.sum(1), values=values)
    rest = torch.randn(2, 2, 3)
    out = ShapleyLoss(stop_grad=True, mask_loss="ce")(
        outputs, torch.tensor([0, 2]), coalitions, sv_targets=rest
    )
    want = shapley_regression_loss(phi, torch.cat([values, rest], 1), coalitions, stop_grad=True)
    torch.testing.assert_close(out.sv, want.detach())
    torch.testing.assert_close(out.cls, F.cross_entropy(phi.sum(1), torch.tensor([0, 2])).detach())
    with pytest.raises(ValueError, match="sv_targets .* need stop_grad=True"):
        ShapleyLoss()(outputs, torch.tensor([0, 2]), coalitions, sv_targets=rest)
    with pytest.raises(ValueError, match=r"outputs.values must be \(B, G, K\) = \(2, 4, K\)"):
        ShapleyLoss()(outputs, torch.tensor([0, 2]), coalitions)
    with pytest.raises(TypeError, match="takes the model's outputs, not the model: shapley_step"):
        ShapleyLoss()(
            tiny(), torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
        )  # the call before the pure loss
