"""The sweeps' report: Markdown from a result (``train_sweeps.json``), one section per part.

markdown(json.loads(Path("benchmarks/results/2026-11-26-cpu/train_sweeps.json").read_text()))
"""

from __future__ import annotations

from benchmarks import harness
from benchmarks.experiments.train_sweeps.analysis import stop_grad_rows
from benchmarks.experiments.train_sweeps.config import TARGET_ACC_GAP, TARGET_POINTING, TARGET_REL_ERR

__all__ = ["markdown"]


def _pm(stat: dict, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{stat['mean'] * scale:{fmt}}"
    if stat["std"] is not None:
        text += f" ± {stat['std'] * scale:{fmt}}"
    return text + suffix


def _scale_name(scale: str) -> str:
    return {
        "raw": "raw",
        "relative": "relative (÷ sg‖f(x)‖² + 1)",
        "player": "player (÷ sg‖Φ(x)‖²/N + 10⁻³)",
        "centered": "centered (÷ sg‖Φ(x) − mean_k Φ(x)‖²/N + 10⁻³)",
    }[scale]


def _loss_name(row: dict, scale_name=None) -> str:
    """ℓ_sv's scale, and whether its gradient flows through the targets (rows from before the
    option have no ``stop_grad``)."""
    name = (scale_name or _scale_name)(row["sv_scale"])
    return name if row.get("stop_grad", True) else f"{name}, gradient through v_x(S)"


def _run_table(rows: list[dict], columns: list[tuple[str, str, str]], scale_name) -> str:
    """λ, μ, ℓ_sv scale, seeds, accuracy and held-out ℓ_sv of each run group, then ``columns``
    (header, metric, format)."""
    table = [
        [
            f"{row['lam']:g}",
            f"{row['mu']:g}",
            _loss_name(row, scale_name) if row["lam"] else "—",
            len(row["seeds"]),
            _pm(row["test_acc"], ".1f", 100, "%"),
            _pm(row["test_sv"], ".3f"),
            *(_pm(row[key], fmt) for _, key, fmt in columns),
        ]
        for row in rows
    ]
    headers = ["λ", "μ", "ℓ_sv scale", "seeds", "test accuracy", "held-out ℓ_sv", *(h for h, _, _ in columns)]
    return harness.markdown_table(headers, table, align="rrl" + "r" * (3 + len(columns)))


def markdown(result: dict) -> str:
    lines = _header(result)
    if "grad" in result:
        lines += _grad_section(result["grad"], result.get("timing"))
    if "lam" in result:
        lines += _lam_section(result["lam"])
    if "evidence" in result:
        lines += _evidence_section(result)
    if "fp8" in result:
        lines += _fp8_section(result["fp8"])
    return "\n".join(lines)


def _header(result: dict) -> list[str]:
    env = result["environment"]
    config = result["config"]
    players = (config["img_size"] // config["patch_size"]) ** 2
    return [
        "# Training sweeps: forward-only coalitions and the scale of ℓ_sv",
        "",
        (
            f"{harness.hardware_name(env)}, torch {env['torch']}, shapkern {env['shapkern']}, "
            f"{env['date']}. {config['epochs']} epochs, the default model (timm ViT, depth 3, width 64, "
            f"{players} patches), KL mask loss, M = 8 paired coalitions. Mean ± std over seeds. "
            "rel. error: ‖Φ − φ_exact‖/‖φ_exact‖ against the exact Shapley values of the model's own "
            f"value function (all 2^{players} coalitions), mean over the first {config['exact_images']} "
            "test images of each seed's split. Held-out ℓ_sv: raw squared error on fixed coalitions of "
            "the test set. mean ‖f(x)‖²: the squared norm of the logits on the test set, and of the logits "
            "less their mean over classes (what softmax sees)."
        ),
        "",
        f"Command: `{result['command']}`",
        "",
    ]


def _grad_table(grad: dict, timing: dict | None) -> str:
    verdicts = {v["grad_coalitions"]: v for v in grad["decision"]["verdicts"]}
    timing_rows = stop_grad_rows(timing)
    table = []
    for row in grad["rows"]:
        g = row["grad_coalitions"]
        t, v = timing_rows.get(g), verdicts[g]
        table.append(
            [
                f"{g} of 8",
                len(row["seeds"]),
                _pm(row["test_acc"], ".1f", 100, "%"),
                _pm(row["rel_err"], ".3f"),
                _pm(row["rel_err_centred"], ".3f"),
                _pm(row["test_sv"], ".3f"),
                f"{t['ms_per_step']:.0f}" if t else "—",
                f"{t['ratio_median']:.2f} ({t['ratio_min']:.2f}–{t['ratio_max']:.2f})" if t else "—",
                "yes" if v["within_noise"] else "no",
            ]
        )
    headers = [
        "G (grad coalitions)",
        "seeds",
        "test accuracy",
        "rel. error vs exact",
        "class-centred",
        "held-out ℓ_sv",
        f"step ms ({timing['clock'] if timing else '—'} clock)",
        "step time vs G = 8 (range)",
        "within noise of G = 8",
    ]
    return harness.markdown_table(headers, table, align="rrrrrrrrc")


def _timing_notes(timing: dict) -> list[str]:
    lines = [
        (
            "Step time: `Trainer.backward` + `step` of each G on the same "
            f"{timing['steps_per_call']} batches of 64, {timing['repeats']} interleaved rounds in "
            f"one process, {timing['clock']} clock; the ratio is taken round by round "
            "(median, min–max)."
        ),
        "",
    ]
    for t in timing["rows"]:
        if not t.get("stop_grad", True):
            lines += [
                (
                    f"The default step (λ = {t['lam']:g}, ℓ_sv's gradient through its targets, all "
                    f"{t['grad_coalitions']} coalitions graded), timed in the same rounds: "
                    f"{t['ms_per_step']:.0f} ms, {t['ratio_median']:.2f} "
                    f"({t['ratio_min']:.2f}–{t['ratio_max']:.2f}) × G = {t['grad_coalitions']}'s."
                ),
                "",
            ]
    return lines


def _grad_section(grad: dict, timing: dict | None) -> list[str]:
    lines = ["## Coalitions that carry gradients (stop-gradient ℓ_sv, λ = 0.1, μ = 1, raw)", ""]
    lines += [_grad_table(grad, timing)]
    if timing:
        lines += _timing_notes(timing)
    lines += [
        (
            "Within noise: accuracy not lower and error not higher than G = 8's by more than two "
            "standard errors of the difference over seeds. Recommended: "
            f"**G = {grad['decision']['recommended']}**."
        ),
        "",
    ]
    return lines


def _lam_section(lam: dict) -> list[str]:
    lines = [
        "## λ sweep on digits: raw and scale-free ℓ_sv (μ = 1; λ = μ = 0 is classification only)",
        "",
    ]
    columns = [
        ("rel. error vs exact", "rel_err", ".3f"),
        ("class-centred", "rel_err_centred", ".3f"),
        ("mean ‖f(x)‖²", "test_logit_sq", ".0f"),
        ("centred over classes", "test_logit_sq_centered", ".0f"),
    ]
    lines += [_run_table(lam["rows"], columns, _scale_name)]
    table = [
        [
            _loss_name(t),
            f"{t['lam']:g}",
            t["seeds"],
            f"{t['acc_gap_points']:+.1f}",
            f"{t['rel_err']:.3f}" if t["rel_err"] is not None else "—",
            "yes" if t["acc_ok"] and t["err_ok"] else "no",
        ]
        for t in lam["targets"]
    ]
    headers = [
        "ℓ_sv scale",
        "λ",
        "seeds",
        "accuracy below classification only (points)",
        "rel. error",
        "meets both targets",
    ]
    return lines + [
        (
            f"Targets (issue 17) at λ = 1 and 10: accuracy within {100 * TARGET_ACC_GAP:.0f} point of "
            f"classification only, rel. error ≤ {TARGET_REL_ERR}."
        ),
        "",
        harness.markdown_table(headers, table, align="lrrrrc"),
    ]


def _evidence_section(result: dict) -> list[str]:
    columns = [("pointing game", "pointing", ".3f"), ("AUROC", "auroc", ".3f"), ("mIoU", "miou", ".3f")]
    return [
        (
            f"## Evidence data (pointing game target ≥ {TARGET_POINTING}; ℓ_sv scale "
            f"{result['config']['evidence_scale']})"
        ),
        "",
        (
            "Φ(x) of the true class against the ground-truth evidence patches (at least half covered), "
            "on every test image."
        ),
        "",
        _run_table(result["evidence"]["rows"], columns, str),
    ]


def _fp8_section(fp8: dict) -> list[str]:
    table = [
        [
            row["target_precision"],
            len(row["seeds"]),
            _pm(row["test_acc"], ".1f", 100, "%"),
            _pm(row["rel_err"], ".3f"),
            _pm(row["rel_err_centred"], ".3f"),
            _pm(row["test_sv"], ".3f"),
        ]
        for row in fp8["rows"]
    ]
    headers = ["targets", "seeds", "test accuracy", "rel. error vs exact", "class-centred", "held-out ℓ_sv"]
    return [
        "## fp8 ℓ_sv targets (stop-gradient ℓ_sv, λ = 0.1, μ = 1, raw, G = 2 of 8)",
        "",
        (
            "The forward-only coalitions that serve as ℓ_sv targets alone run their encoder GEMMs in "
            'e4m3 (`target_precision="fp8"`); the coalitions with gradients stay in the model\'s dtype.'
        ),
        "",
        harness.markdown_table(headers, table, align="lrrrrr"),
    ]
