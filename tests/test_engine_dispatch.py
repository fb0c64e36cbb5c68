"""The engine's measured dispatch (engine/dispatch.py) and its pair attention: attention="pairs" equals
the varlen path, forward and backward, for timm ViT, Eva (RoPE) and Beit (relative position bias);
a table route is taken where it applies (device, family, phase, dtype, nearest P + N, a compatible
block path) and nowhere else; the empty committed table keeps the default."""

import pytest
import torch
from gradient_checks import outputs_and_gradients
from timm.models.beit import Beit
from timm.models.eva import Eva
from tiny_models import tiny_vit

from shapkern import fused_coalition_forward, sample_coalitions
from shapkern.engine import dispatch, dispatch_table
from shapkern.engine.dispatch import Route, find_route

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}


def perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():  # timm zero-inits biases and bias tables: make every parameter matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


MODELS = {
    "vit": lambda: tiny_vit("cls_token"),
    "eva-rope": lambda: perturbed(Eva(**SMALL, use_rot_pos_emb=True, ref_feat_shape=(2, 2))),
    "beit-rel-pos": lambda: perturbed(Beit(**SMALL, use_abs_pos_emb=False, use_rel_pos_bias=True)),
}


def route(**fields) -> Route:
    base = {"device": "cpu", "family": "timm VisionTransformer", "phase": "forward", "dtype": "float32"}
    base |= {"tokens": 17, "blocks": "plain", "attention": "pairs", "speedup": 1.2, "source": "test"}
    return Route(**{**base, **fields})


@pytest.mark.parametrize("name", MODELS)
def test_pair_attention_equals_the_varlen_path_with_gradients(name):
    model = MODELS[name]()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    coalitions = sample_coalitions(2, 6, 16, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(3))
    got, want = (
        outputs_and_gradients(
            lambda x, a=attention: fused_coalition_forward(model, x, coalitions, attention=a),
            model,
            images,
            weights,
        )
        for attention in ("pairs", "varlen")
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pair_attention_needs_pairs_and_attention_names_are_checked():
    model, images = tiny_vit("cls_token"), torch.randn(1, 3, 32, 32)
    unpaired = torch.rand(1, 3, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    with pytest.raises(ValueError, match="attention='pairs' runs complementary coalition pairs"):
        fused_coalition_forward(model, images, unpaired, attention="pairs")
    with pytest.raises(ValueError, match="attention must be one of"):
        fused_coalition_forward(model, images, unpaired, attention="flash")


def test_find_route_matches_every_key_and_takes_the_nearest_length():
    cpu = torch.device("cpu")
    routes = (route(tokens=50), route(tokens=197, attention="varlen"), route(phase="forward+backward"))
    assert find_route(routes, cpu, "timm VisionTransformer", "forward", torch.float32, 170).tokens == 197
    assert find_route(routes, cpu, "timm VisionTransformer", "forward", torch.float32, 65).tokens == 50
    assert find_route(routes, cpu, "timm VisionTransformer", "forward", torch.bfloat16, 65) is None
    assert find_route(routes, cpu, "timm Beit", "forward", torch.float32, 65) is None
    vit = "timm VisionTransformer"
    assert find_route(routes, cpu, vit, "forward+backward", torch.float32, 9).tokens == 17
    # No further than a factor of 2 from what was measured.
    assert find_route(routes, cpu, vit, "forward", torch.float32, 26).tokens == 50
    assert find_route(routes, cpu, vit, "forward", torch.float32, 24) is None
    assert find_route(routes, cpu, vit, "forward", torch.float32, 395) is None
    assert find_route(routes, cpu, vit, "forward+backward", torch.float32, 8) is None


class Spy:
    """Counts the calls of the pair attention op the engine dispatches to."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def pair_spy(monkeypatch):
    spy = Spy(dispatch.ATTENTION_FNS["pairs"])
    monkeypatch.setitem(dispatch.ATTENTION_FNS, "pairs", spy)
    return spy


def test_the_committed_table_keeps_the_default_where_it_measured_nothing(pair_spy):
    assert all(r.device != "cpu" for r in dispatch_table.ROUTES)  # measured on GPUs only
    model, images = tiny_vit("cls_token"), torch.randn(2, 3, 32, 32)
    fused_coalition_forward(model, images, sample_coalitions(2, 4, 16))
    assert pair_spy.calls == 0


def test_a_route_is_taken_where_it_applies_and_nowhere_else(monkeypatch, pair_spy):
    model, images = tiny_vit("cls_token"), torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(0))
    want = fused_coalition_forward(model, images, coalitions, attention="varlen")
    monkeypatch.setattr(dispatch_table, "ROUTES", (route(),))
    with torch.no_grad():
        torch.testing.assert_close(fused_coalition_forward(model, images, coalitions), want)
    assert pair_spy.calls == 2  # one per block: the route's pair attention ran
    # Not where it does not apply: another phase, a fixed attention or block path, unpaired coalitions.
    fused_coalition_forward(model, images, coalitions)  # autograd records: forward+backward
    with torch.no_grad():
        fused_coalition_forward(model, images, coalitions, attention="varlen")
        fused_coalition_forward(model, images, coalitions, blocks="fused")
        fused_coalition_forward(model, images, coalitions, paired=False)
    assert pair_spy.calls == 2
    # A route whose block path the model does not run is not taken either.
    monkeypatch.setattr(dispatch_table, "ROUTES", (route(family="timm Beit", blocks="fused"),))
    beit = MODELS["beit-rel-pos"]()
    with torch.no_grad():
        fused_coalition_forward(beit, images, coalitions)
    assert pair_spy.calls == 2


def test_a_table_file_named_by_the_environment_is_the_one_in_force(tmp_path, monkeypatch, pair_spy):
    import dataclasses
    import json

    model, images = tiny_vit("cls_token"), torch.randn(2, 3, 32, 32)
    coalitions = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(0))
    table = tmp_path / "routes.json"
    table.write_text(json.dumps({"routes": [dataclasses.asdict(route())]}))
    monkeypatch.setenv("SHAPKERN_DISPATCH_TABLE", str(table))
    with torch.no_grad():
        fused_coalition_forward(model, images, coalitions)
    assert pair_spy.calls == 2
    (tmp_path / "bad.json").write_text('{"routes": [{"device": "cpu"}]}')
    monkeypatch.setenv("SHAPKERN_DISPATCH_TABLE", str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="is not a dispatch table written by benchmarks.dispatch_table"):
        fused_coalition_forward(model, images, coalitions)
    monkeypatch.setenv("SHAPKERN_DISPATCH_TABLE", str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="cannot read a dispatch table"):
        fused_coalition_forward(model, images, coalitions)


@pytest.mark.cuda
@pytest.mark.parametrize("blocks", ["plain", "compiled"])
def test_cuda_pair_attention_matches_varlen_at_vit_base(blocks):
    """The pair route on the GPU (SDPA's fused kernels over dense pair rows, bf16 autocast) against the
    varlen route (Triton), logits and gradients to the images, eager and compiled blocks."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224").cuda().eval()
    images = torch.randn(4, 3, 224, 224, device="cuda")
    coalitions = sample_coalitions(4, 8, 196, generator=torch.Generator().manual_seed(1)).cuda()
    outputs = {}
    for attention in ("pairs", "varlen"):
        x = images.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fused_coalition_forward(model, x, coalitions, blocks=blocks, attention=attention)
        out.float().square().mean().backward()
        outputs[attention] = (out.float().detach(), x.grad)
    for got, want in zip(outputs["pairs"], outputs["varlen"], strict=True):
        assert ((got - want).norm() / want.norm()).item() < 2e-2
