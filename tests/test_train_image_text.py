"""Image-text training (training/contrastive.py, training/retrieval.py, and the task in config, setup,
trainer and the command line): the loss against slow references, retrieval recall, and a tiny
``shapkern train --task image-text`` run that resumes."""

import json
import math

import pytest
import torch

from shapkern.checkpoint import load_checkpoint
from shapkern.cli import main
from shapkern.models import ImageTextOutput
from shapkern.training import ContrastiveLoss, TrainConfig, contrastive_loss, image_text_step, recall_at_k


def outputs(batch=3, players=4, dim=5, num=2, bias=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    phi = torch.randn(batch, players, dim, generator=gen)
    values = torch.randn(batch, num, dim, generator=gen)
    text = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    coalitions = torch.rand(batch, num, players, generator=gen) < 0.5
    scale = torch.tensor(2.5)
    out = ImageTextOutput(phi, phi.sum(1), values, text, scale, None if bias is None else torch.tensor(bias))
    return out, coalitions


def slow_contrastive(sims, contrastive):
    n = len(sims)
    if contrastive == "softmax":
        rows = [
            -math.log(math.exp(sims[i][i]) / sum(math.exp(sims[i][j]) for j in range(n))) for i in range(n)
        ]
        cols = [
            -math.log(math.exp(sims[i][i]) / sum(math.exp(sims[j][i]) for j in range(n))) for i in range(n)
        ]
        return (sum(rows) / n + sum(cols) / n) / 2
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * sims[i][j])))
    return total / n


@pytest.mark.parametrize("contrastive", ["softmax", "sigmoid"])
def test_contrastive_loss_equals_a_slow_reference(contrastive):
    sims = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    assert math.isclose(
        float(contrastive_loss(sims, contrastive)), slow_contrastive(sims.tolist(), contrastive)
    )


def slow_sv_and_mask(out, coalitions, contrastive):
    """ℓ_sv and ℓ_mask by loops over images b, coalitions m and texts t (the game's values
    v_{x,t}(S) = exp(τ)⟨f(x_S), e_t⟩/‖f(x)‖ + b, at the full image the cosine similarity)."""
    phi, image, values, text, scale, bias = (t.double() if t is not None else None for t in out)
    b_ = 0.0 if bias is None else float(bias)
    batch, num, _ = coalitions.shape
    sv, kl = 0.0, 0.0
    for b in range(batch):
        norm = float(image[b].norm())  # v_{x,t}(S) = exp(τ)⟨f(x_S), e_t⟩/‖f(x)‖ + b
        full = [float(scale * image[b] @ text[t]) / norm + b_ for t in range(batch)]
        for m in range(num):
            masked = [float(scale * values[b, m] @ text[t]) / norm + b_ for t in range(batch)]
            for t in range(batch):
                players = [n for n in range(phi.shape[1]) if coalitions[b, m, n]]
                shapley = sum(float(scale * phi[b, n] @ text[t]) / norm for n in players)
                sv += (masked[t] - b_ - shapley) ** 2
            if contrastive == "softmax":
                p = torch.tensor(full).softmax(0)
                q = torch.tensor(masked).softmax(0)
                kl += float((p * (p.log() - q.log())).sum())
            else:
                for t in range(batch):
                    p, q = 1 / (1 + math.exp(-full[t])), 1 / (1 + math.exp(-masked[t]))
                    kl += (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))) / batch
    return sv / (batch * num * batch), kl / (batch * num)


@pytest.mark.parametrize("contrastive,bias", [("softmax", None), ("sigmoid", -1.5)])
def test_sv_and_mask_losses_equal_slow_references(contrastive, bias):
    out, coalitions = outputs(bias=bias)
    loss = ContrastiveLoss(lam=2.0, mu=0.5, contrastive=contrastive)(out, coalitions)
    sv, mask = slow_sv_and_mask(out, coalitions, contrastive)
    cosine = [
        [float(out.scale * out.image[i] @ out.text[t] / out.image[i].norm()) + (bias or 0) for t in range(3)]
        for i in range(3)
    ]
    assert torch.allclose(loss.logits, torch.tensor(cosine), atol=1e-5)
    con = slow_contrastive(cosine, contrastive)
    assert math.isclose(float(loss.sv), sv, rel_tol=1e-5) and math.isclose(
        float(loss.mask), mask, rel_tol=1e-4
    )
    assert math.isclose(float(loss.total), con + 2.0 * sv + 0.5 * mask, rel_tol=1e-5)
    assert loss.logits.shape == (3, 3)


def test_sv_and_mask_train_the_image_side_only():
    out, coalitions = outputs()
    text, scale = out.text.clone().requires_grad_(), out.scale.clone().requires_grad_()
    out = out._replace(text=text, scale=scale)
    loss = ContrastiveLoss(lam=1.0, mu=1.0)(out, coalitions)
    (loss.total - contrastive_loss(out.similarity())).backward()
    assert text.grad.abs().max() < 1e-6 and scale.grad.abs().max() < 1e-6


class Spy(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, images, texts, coalitions, *, paired):
        self.calls.append(coalitions)
        return self.out


def test_contrastive_only_runs_no_coalitions():
    out, coalitions = outputs()
    spy = Spy(out)
    result = image_text_step(spy, ContrastiveLoss(0.0, 0.0), None, None, coalitions)
    assert spy.calls == [None] and float(result.sv) == 0 and float(result.mask) == 0
    image_text_step(spy, ContrastiveLoss(1.0, 0.0), None, None, coalitions)
    assert spy.calls[-1] is coalitions


def test_recall_counts_ranks_both_ways():
    # 3 images; texts 0, 1 describe image 0, text 2 image 1, text 3 image 2
    sims = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.8, 0.2, 0.7, 0.0], [0.2, 0.0, 0.9, 0.3]])
    owners = torch.tensor([0, 0, 1, 2])
    got = recall_at_k(sims, owners, ks=(1, 2))
    # image→text: image 0 best own text 0.9 ranks 1st; image 1 own 0.7 ranks 2nd; image 2 own 0.3 2nd
    assert got["r1_i2t"] == pytest.approx(1 / 3) and got["r2_i2t"] == 1.0
    # text→image: t0 -> image 0 (0.1) ranks 3rd, t1 1st, t2 -> image 1 (0.7) 2nd, t3 -> image 2 1st
    assert got["r1_t2i"] == 0.5 and got["r2_t2i"] == 0.75


def test_classification_options_are_refused_for_image_text():
    with pytest.raises(ValueError, match="--stop-grad applies to --task classification"):
        TrainConfig.for_task("image-text", stop_grad=True).validate()
    with pytest.raises(ValueError, match="'kl' or None"):
        TrainConfig.for_task("image-text", mask_loss="ce").validate()
    with pytest.raises(ValueError, match="--task"):
        TrainConfig.for_task("detection")
    cfg = TrainConfig.for_task("image-text")
    assert (cfg.data, cfg.out) == ("captions", "runs/captions")
    assert TrainConfig.for_task("image-text", data="coco-captions").data == "coco-captions"


TINY = (
    "--img-size 16 --patch-size 4 --depth 1 --embed-dim 32 --num-heads 2 --joint-dim 16 --batch-size 16 "
    "--num-coalitions 4 --limit-train 12 --limit-test 8 --faith-images 2 "
    "--heatmap-images 4 --no-progress"
).split()


def test_train_image_text_from_the_command_line_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--task", "image-text", "--epochs", "1", "--out", out, *TINY]) == 0
    first = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert first["epoch"] == 1 and first["config"]["task"] == "image-text" and "vocab" in first["data"]
    assert main(["train", "--resume", "--epochs", "2", "--out", out]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("train_sv", "train_mask", "test_r1_i2t", "test_r5_t2i", "test_sv", "test_pointing"):
        assert key in lines[-1]
    assert 0 <= lines[-1]["test_pointing"] <= 1 and lines[-1]["faithfulness_rel_err"] >= 0
    assert (tmp_path / "run" / "explanations.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "recall@1 image→text" in out
    assert "captions (12 train / 8 test images, " in out  # images, and their captions as the items
