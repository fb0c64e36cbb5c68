import pytest
import torch

from shapkern.coalitions import sample_coalitions
from shapkern.packed import pack_plan


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_pack_plan_layout(paired, prefix):
    gen = torch.Generator().manual_seed(prefix)
    batch, num, players = 3, 4, 9
    masks = sample_coalitions(batch, num, players, paired=paired, generator=gen)
    if not paired:
        masks[0, 0] = False  # an empty coalition
    rows = masks.view(-1, players)
    row_image = torch.arange(batch).repeat_interleave(num)
    plan = pack_plan(rows, row_image, prefix, paired=paired)
    width = prefix + players
    start = 0
    for r in range(batch * num):
        kept = [j for j in range(prefix)] + [prefix + n for n in range(players) if rows[r, n]]
        seq = plan.gather_index[start : start + len(kept)]
        assert seq.tolist() == [row_image[r].item() * width + j for j in kept]
        assert plan.cu_seqlens[r].item() == start
        assert plan.token_row[start : start + len(kept)].eq(r).all()
        start += len(kept)
    assert plan.cu_seqlens[-1].item() == start == plan.num_tokens
    assert plan.cu_seqlens.dtype == torch.int32
    assert plan.max_seqlen == width
    assert torch.equal(plan.patch_counts, rows.sum(-1))
    assert torch.equal(plan.token_patch, plan.gather_index % width - prefix)


def test_pack_plan_rejects_unpaired_rows_marked_paired():
    masks = torch.tensor([[True, False], [True, False]])
    with pytest.raises(ValueError, match="not complements"):
        pack_plan(masks, torch.zeros(2, dtype=torch.long), 1, paired=True)


@pytest.mark.parametrize("paired", [False, True])
def test_pack_plan_detects_pairs_by_default(paired):
    masks = sample_coalitions(2, 6, 9, paired=paired, generator=torch.Generator().manual_seed(1))
    rows, row_image = masks.view(-1, 9), torch.arange(2).repeat_interleave(6)
    detected, given = pack_plan(rows, row_image, 1), pack_plan(rows, row_image, 1, paired=paired)
    for field in ("gather_index", "cu_seqlens", "token_patch", "patch_counts"):
        assert torch.equal(getattr(detected, field), getattr(given, field))
