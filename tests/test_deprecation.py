"""Every deprecated name, keyword and top-level alias still works for one release and warns with a
DeprecationWarning that names its replacement (docs/api.md lists them; delete a case with its alias)."""

import importlib

import pytest
import torch
from tiny_models import SHAPLEY_SIZES, tiny_shapley_vit, tiny_vit

import shapkern
from shapkern.coalitions import all_coalitions, sample_coalitions, sample_permutations, seeded_coalitions
from shapkern.engine import fused_coalition_forward, masked_input_forward
from shapkern.games import PackedGame, PixelGame, SelfExplainingGame, model_game
from shapkern.ops import pack_coalitions, unpack_coalitions
from shapkern.packed import pack_plan

COALITIONS = sample_coalitions(2, 4, 16, generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(2, 3, 16, 16)


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check(old, new, match: str) -> None:
    """``old()`` warns naming the replacement (``match``) and returns what ``new()`` returns."""
    with pytest.warns(DeprecationWarning, match=match):
        got = old()
    assert equal(got, new())


# --- renamed functions ----------------------------------------------------------------------------


def test_pack_masks():
    import shapkern.ops as ops

    check(lambda: ops.pack_masks(COALITIONS), lambda: pack_coalitions(COALITIONS), "pack_coalitions")


def test_unpack_masks():
    import shapkern.ops as ops

    packed = pack_coalitions(COALITIONS)
    check(lambda: ops.unpack_masks(packed, 16), lambda: unpack_coalitions(packed, 16), "unpack_coalitions")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("pack_masks", "pack_coalitions"),
        ("unpack_masks", "unpack_coalitions"),
        ("pack_masks_reference", "pack_coalitions_reference"),
        ("unpack_masks_reference", "unpack_coalitions_reference"),
    ],
)
def test_ops_reduce_serves_the_bit_packing_it_moved(old, new):
    from shapkern.ops import bitpack, reduce

    with pytest.warns(DeprecationWarning, match=f"shapkern.ops.bitpack.{new}"):
        assert getattr(reduce, old) is getattr(bitpack, new)


def test_check_chunk_size():
    import shapkern.engine as engine

    with pytest.warns(DeprecationWarning, match="check_chunk_rows"):
        engine.check_chunk_size(4)
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ValueError, match="chunk_rows must be a positive int"),
    ):
        engine.check_chunk_size(0)


def test_value_function():
    from shapkern.explainers import value_function

    model = tiny_vit(sizes=SHAPLEY_SIZES)
    with torch.no_grad():
        check(
            lambda: value_function(model, IMAGES)(COALITIONS),
            lambda: model_game(model, IMAGES)(COALITIONS),
            "shapkern.model_game",
        )


# --- renamed keyword arguments --------------------------------------------------------------------


def test_sample_coalitions_method():
    check(
        lambda: sample_coalitions(2, 4, 9, method="uniform", generator=torch.Generator().manual_seed(1)),
        lambda: sample_coalitions(2, 4, 9, sampler="uniform", generator=torch.Generator().manual_seed(1)),
        r"sample_coalitions\(method=...\) is deprecated: use sampler=",
    )


def test_seeded_coalitions_method():
    kw = {"seed": 0, "epoch": 1, "num": 4, "players": 9}
    check(
        lambda: seeded_coalitions(torch.tensor([3, 5]), method="bernoulli", **kw),
        lambda: seeded_coalitions(torch.tensor([3, 5]), sampler="bernoulli", **kw),
        "use sampler=",
    )


def test_all_coalitions_chunk_size():
    check(
        lambda: list(all_coalitions(5, chunk_size=7)),
        lambda: list(all_coalitions(5, coalitions_per_chunk=7)),
        "use coalitions_per_chunk=",
    )


def test_sample_permutations_antithetic():
    check(
        lambda: sample_permutations(2, 4, 6, antithetic=False, generator=torch.Generator().manual_seed(2)),
        lambda: sample_permutations(2, 4, 6, paired=False, generator=torch.Generator().manual_seed(2)),
        "use paired=",
    )


def test_fused_coalition_forward_chunk_size():
    model = tiny_vit(sizes=SHAPLEY_SIZES)
    with torch.no_grad():
        check(
            lambda: fused_coalition_forward(model, IMAGES, COALITIONS, chunk_size=2),
            lambda: fused_coalition_forward(model, IMAGES, COALITIONS, chunk_rows=2),
            r"fused_coalition_forward\(chunk_size=...\) is deprecated: use chunk_rows=",
        )


def test_masked_input_forward_chunk_size():
    model = tiny_vit(sizes=SHAPLEY_SIZES)
    with torch.no_grad():
        check(
            lambda: masked_input_forward(model, IMAGES, COALITIONS, chunk_size=3),
            lambda: masked_input_forward(model, IMAGES, COALITIONS, chunk_rows=3),
            "use chunk_rows=",
        )


@pytest.mark.parametrize("method", ["coalition_values", "coalition_forward"])
def test_shapley_vit_chunk_size(method):
    model = tiny_shapley_vit()

    def run(**chunk):
        if method == "coalition_values":
            return model.coalition_values(IMAGES, COALITIONS, **chunk)
        return model.coalition_forward(IMAGES, **chunk)(COALITIONS)

    with torch.no_grad():
        check(lambda: run(chunk_size=2), lambda: run(chunk_rows=2), rf"ShapleyViT.{method}\(chunk_size=")


def test_model_game_chunk_size():
    model = tiny_vit(sizes=SHAPLEY_SIZES)
    with torch.no_grad():
        check(
            lambda: model_game(model, IMAGES, chunk_size=2)(COALITIONS),
            lambda: model_game(model, IMAGES, chunk_rows=2)(COALITIONS),
            r"model_game\(chunk_size=...\) is deprecated: use chunk_rows=",
        )


@pytest.mark.parametrize("game", [PackedGame, PixelGame, SelfExplainingGame])
def test_games_chunk_size(game):
    model = tiny_shapley_vit() if game is SelfExplainingGame else tiny_vit(sizes=SHAPLEY_SIZES)
    with torch.no_grad():
        check(
            lambda: game(model, IMAGES, chunk_size=2)(COALITIONS),
            lambda: game(model, IMAGES, chunk_rows=2)(COALITIONS),
            rf"{game.__name__}\(chunk_size=...\) is deprecated: use chunk_rows=",
        )


def test_pack_plan_masks():
    rows, row_image = COALITIONS.view(-1, 16), torch.arange(2).repeat_interleave(4)
    check(
        lambda: pack_plan(masks=rows, row_image=row_image, num_prefix_tokens=1).gather_index,
        lambda: pack_plan(rows, row_image, 1).gather_index,
        "use coalitions=",
    )


def test_old_and_new_keyword_together_is_an_error():
    with pytest.raises(TypeError, match="pass only sampler="):
        sample_coalitions(2, 4, 9, method="uniform", sampler="shapley")


@pytest.mark.parametrize(
    ("old", "new"), [("batch_size", "coalitions_per_call"), ("chunk_size", "chunk_rows")]
)
def test_shapkern_game_keywords(old, new):
    pytest.importorskip("shapiq")
    from shapkern.integrations.shapiq import ShapkernGame

    model, image = tiny_vit(sizes=SHAPLEY_SIZES), IMAGES[0]
    with pytest.warns(DeprecationWarning, match=f"use {new}="):
        game = ShapkernGame(model, image, **{old: 5})
    coalitions = COALITIONS[0].numpy()
    assert (
        game.value_function(coalitions) == ShapkernGame(model, image, **{new: 5}).value_function(coalitions)
    ).all()


def test_shapkern_game_default_batch():
    pytest.importorskip("shapiq")
    from shapkern.integrations import shapiq

    with pytest.warns(DeprecationWarning, match="DEFAULT_COALITIONS_PER_CALL"):
        assert shapiq.DEFAULT_BATCH == shapiq.DEFAULT_COALITIONS_PER_CALL


# --- names moved off the top level ----------------------------------------------------------------

MOVED = {
    "PackPlan": "shapkern.packed.PackPlan",
    "PackedTokens": "shapkern.engine.PackedTokens",
    "ValueFunction": "shapkern.games.ValueFunction",
    "coalition_reduce": "shapkern.ops.coalition_reduce",
    "coalition_tokens": "shapkern.engine.coalition_tokens",
    "masked_input_forward": "shapkern.engine.masked_input_forward",
    "pack_masks": "shapkern.ops.pack_coalitions",
    "pack_plan": "shapkern.packed.pack_plan",
    "pack_tokens": "shapkern.packed.pack_tokens",
    "permutation_chain": "shapkern.coalitions.permutation_chain",
    "seeded_coalitions": "shapkern.coalitions.seeded_coalitions",
    "segment_sum": "shapkern.ops.segment_sum",
    "unpack_masks": "shapkern.ops.unpack_coalitions",
    "value_function": "shapkern.model_game",
    "varlen_attention": "shapkern.ops.varlen_attention",
}


@pytest.mark.parametrize(("old", "new"), MOVED.items())
def test_top_level_names_moved_to_the_lower_tier(old, new):
    home, _, name = new.rpartition(".")
    assert old not in shapkern.__all__
    with pytest.warns(DeprecationWarning, match=f"shapkern.{old} is deprecated: use {new}"):
        assert getattr(shapkern, old) is getattr(importlib.import_module(home), name)


def test_unknown_top_level_names_still_raise():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        shapkern.no_such_name  # noqa: B018
