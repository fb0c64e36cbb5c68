import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_shapley_vit

from shapkern import sample_coalitions
from shapkern.training import ShapleyLoss, shapley_regression_loss
from shapkern.training.losses import default_grad_coalitions


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
    shapley_regression_loss(phi, values, coalitions).backward()
    assert values.grad is None and phi.grad is not None
    shapley_regression_loss(phi, values, coalitions, stop_grad=False).backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_through_the_model(stop_grad):
    model = tiny()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    out = ShapleyLoss(num_coalitions=4, mask_loss=None, stop_grad=stop_grad)(model, images, labels)
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
    loss = ShapleyLoss(
        lam=0.7,
        mu=0.3,
        num_coalitions=4,
        mask_loss=mask_loss,
        grad_coalitions=grad_coalitions,
        stop_grad=True,
    )
    assert loss.grad_coalitions == (2 if grad_coalitions is None else 4)  # default: M/4, at least a pair
    out = loss(model, images, labels, coalitions)
    grads = torch.autograd.grad(out.total, list(model.parameters()))
    ref = reference_loss(model, images, labels, coalitions, 0.7, 0.3, mask_loss, loss.grad_coalitions)
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
    loss = ShapleyLoss(lam=0.7, mu=0.3, num_coalitions=4)
    assert not loss.stop_grad and loss.grad_coalitions == 4
    out = loss(model, images, labels, coalitions)
    grads = torch.autograd.grad(out.total, list(model.parameters()))
    ref = reference_loss(model, images, labels, coalitions, 0.7, 0.3, "kl", stop_grad=False)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(out.total, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_no_mask_loss_and_bad_arguments():
    model = tiny()
    loss = ShapleyLoss(num_coalitions=2, mask_loss=None)
    out = loss(model, torch.randn(1, 3, 16, 16), torch.tensor([0]))
    torch.testing.assert_close(out.total, out.cls + loss.lam * out.sv)
    with pytest.raises(ValueError, match="mask_loss"):
        ShapleyLoss(mask_loss="mse")
    with pytest.raises(ValueError, match="even"):
        ShapleyLoss(num_coalitions=3)


def _grads(model, loss, images, labels, coalitions):
    model.zero_grad()
    out = loss(model, images, labels, coalitions)
    out.total.backward()
    return out, [p.grad.clone() for p in model.parameters()]


def test_forward_only_coalitions_give_the_same_sv_loss_and_gradients():
    model = tiny().eval()  # no dropout: the two passes see the same model
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 2, 1])
    coalitions = sample_coalitions(3, 8, 16, generator=torch.Generator().manual_seed(4))
    options = {"num_coalitions": 8, "mask_loss": None, "stop_grad": True}
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
    part = ShapleyLoss(num_coalitions=8, grad_coalitions=2, **options)(model, images, labels, coalitions)
    only = ShapleyLoss(num_coalitions=2, **options)(model, images, labels, coalitions[:, :2])
    torch.testing.assert_close(part.mask, only.mask, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="grad_coalitions must be"):
        ShapleyLoss(num_coalitions=8, grad_coalitions=3)
    with pytest.raises(ValueError, match="needs every coalition to carry gradients"):
        ShapleyLoss(num_coalitions=8, grad_coalitions=2)  # the default stop_grad=False


def test_relative_sv_loss_ignores_the_logit_scale():
    phi = torch.randn(4, 16, 3, dtype=torch.float64)
    coalitions = sample_coalitions(4, 8, 16, generator=torch.Generator().manual_seed(6))
    values = torch.bmm(coalitions.double(), phi) + torch.randn(4, 8, 3, dtype=torch.float64)
    logits = phi.sum(1)
    raw = shapley_regression_loss(phi, values, coalitions)
    assert shapley_regression_loss(1e3 * phi, 1e3 * values, coalitions) == pytest.approx(1e6 * float(raw))
    scaled = [shapley_regression_loss(c * phi, c * values, coalitions, logits=c * logits) for c in (1e3, 1e4)]
    error = (torch.bmm(coalitions.double(), phi) - values).square().sum(-1).mean(1)
    want = (error / logits.square().sum(-1)).mean()  # the +1 vanishes against large logits
    assert float(scaled[0]) == pytest.approx(float(want), rel=1e-3)
    assert float(scaled[1]) == pytest.approx(float(want), rel=1e-4)
    with pytest.raises(ValueError, match="sv_scale must be one of"):
        ShapleyLoss(sv_scale="log")


def test_default_grad_coalitions_is_a_quarter_in_whole_pairs():
    assert [default_grad_coalitions(m) for m in (2, 4, 8, 12, 32)] == [2, 2, 2, 2, 8]
    assert [default_grad_coalitions(m, paired=False) for m in (1, 3, 8, 13)] == [1, 1, 2, 3]
    assert ShapleyLoss(num_coalitions=16, stop_grad=True).grad_coalitions == 4
    assert ShapleyLoss(num_coalitions=16).grad_coalitions == 16  # without stop-gradient: all carry them


def test_fp8_targets_run_the_forward_only_coalitions_in_fp8():
    model = tiny().eval()
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 2, 1])
    coalitions = sample_coalitions(3, 8, 16, generator=torch.Generator().manual_seed(7))
    options = {"num_coalitions": 8, "mask_loss": None, "stop_grad": True}
    loss = ShapleyLoss(**options, target_precision="fp8")
    out = loss(model, images, labels, coalitions)
    with torch.no_grad():
        rest = model.coalition_values(images, coalitions[:, 2:], paired=True, precision="fp8")
    want = shapley_regression_loss(out.phi, torch.cat([out.values.detach(), rest], 1), coalitions)
    torch.testing.assert_close(out.sv, want)
    same = ShapleyLoss(**options)(model, images, labels, coalitions)
    assert float(out.sv) != float(same.sv)  # the six forward-only targets did run in e4m3
    assert float(out.sv) == pytest.approx(float(same.sv), rel=0.1)
    out.total.backward()  # the graded coalitions keep their gradients
    assert all(p.grad is not None for p in model.head.parameters())
    with pytest.raises(ValueError, match="all 8 coalitions carry gradients.*need stop_grad=True"):
        ShapleyLoss(num_coalitions=8, target_precision="fp8")  # the default: no stop-gradient
    with pytest.raises(ValueError, match="precision must be one of"):
        ShapleyLoss(target_precision="fp16")
