"""Shared pieces of the benchmarks: the ways to evaluate coalitions, timing and the environment.

Every method maps (model, images (B, C, H, W), paired coalitions bool (B, M, N)) to (B, M, K).
All but ``zero_input`` compute the same value function (token dropping, design.md §1).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import shapkern
from shapkern.engine import embed_tokens

# -- methods -----------------------------------------------------------------------------------


def engine(model, images, coalitions):
    """shapkern, plain path: all kept tokens packed flat, the model's own modules, Triton varlen attention."""
    return shapkern.fused_coalition_forward(model, images, coalitions, paired=True, compiled=False)


def engine_compiled(model, images, coalitions):
    """shapkern engine with its blocks under torch.compile (fused LayerNorm, GELU, residual adds)."""
    return shapkern.fused_coalition_forward(model, images, coalitions, paired=True, compiled=True)


def zero_input(model, images, coalitions):
    """Zero the pixels of absent patches, full forward (Captum/shap style)."""
    return shapkern.masked_input_forward(model, images, coalitions, baseline="zeros", chunk_size=1 << 30)


def key_mask(model, images, coalitions):
    """Full sequence per coalition with a boolean key mask, SDPA (ViT-Shapley style)."""
    batch, num, players = coalitions.shape
    rows = coalitions.reshape(batch * num, players)
    keep = torch.cat([rows.new_ones(batch * num, model.num_prefix_tokens), rows], dim=1)
    feats = model.forward_features(images.repeat_interleave(num, 0), attn_mask=keep[:, None, None, :])
    return model.forward_head(feats).view(batch, num, -1)


def _pair_rows(model, images, coalitions):
    """Complementary pairs as one row [prefix, prefix, N patches] and the token groups (R/2, L)."""
    tokens = embed_tokens(model, images)
    prefix = model.num_prefix_tokens
    _, num, players = coalitions.shape
    rows = torch.cat([tokens[:, :prefix], tokens], dim=1).unsqueeze(1).expand(-1, num // 2, -1, -1)
    first = coalitions[:, 0::2].reshape(-1, players)
    group = torch.cat(
        [first.new_zeros(first.shape[0], prefix), first.new_ones(first.shape[0], prefix), ~first], 1
    )
    return model.norm_pre(rows.reshape(-1, *rows.shape[2:])), group


def _pair_heads(model, x, batch, num):
    prefix = model.num_prefix_tokens
    x = model.norm(x)
    out = torch.stack([model.forward_head(x[:, :prefix]), model.forward_head(x[:, prefix : 2 * prefix])], 1)
    return out.view(batch, num, -1)


def pairs_dense_mask(model, images, coalitions):
    """Complementary pairs packed in one row, dense block-diagonal mask, SDPA."""
    x, group = _pair_rows(model, images, coalitions)
    mask = (group.unsqueeze(2) == group.unsqueeze(1)).unsqueeze(1)
    for block in model.blocks:
        x = block(x, attn_mask=mask)
    return _pair_heads(model, x, *coalitions.shape[:2])


def _block_with_attention(block, x, attend):
    """timm Block on dense rows (R, L, D) with attend(q, k, v) on (R, H, L, Dh)."""
    attn = block.attn
    rows, length, _ = x.shape
    q, k, v = attn.qkv(block.norm1(x)).view(rows, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    out = attend(attn.q_norm(q), attn.k_norm(k), v).transpose(1, 2).reshape(rows, length, -1)
    x = x + block.ls1(attn.proj(attn.norm(out)))
    return x + block.ls2(block.mlp(block.norm2(x)))


_compiled_flex = None


def pairs_flex(model, images, coalitions):
    """Same rows as pairs_dense_mask, FlexAttention document mask (compiled once, mask per call)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    x, group = _pair_rows(model, images, coalitions)
    rows, length = group.shape
    block_mask = create_block_mask(
        lambda b, h, q, kv: group[b, q] == group[b, kv], rows, None, length, length, device=x.device
    )
    for block in model.blocks:
        x = _block_with_attention(block, x, lambda q, k, v: _compiled_flex(q, k, v, block_mask=block_mask))
    return _pair_heads(model, x, *coalitions.shape[:2])


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale=None):
    from torch.nn.attention.varlen import varlen_attn

    if scale is not None:  # pre-scale q: the scale keyword is missing in older torch releases
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def engine_torch_varlen(model, images, coalitions):
    """All kept tokens packed flat, torch.nn.attention.varlen.varlen_attn."""
    return shapkern.fused_coalition_forward(
        model, images, coalitions, paired=True, attention=_torch_varlen, compiled=False
    )


_compiled_pairs = None


def pairs_dense_mask_compiled(model, images, coalitions):
    """pairs_dense_mask under torch.compile (default mode)."""
    global _compiled_pairs
    if _compiled_pairs is None:
        _compiled_pairs = torch.compile(pairs_dense_mask)
    return _compiled_pairs(model, images, coalitions)


# Methods that compile come last, so that a run cut short keeps the others.
METHODS = {
    "shapkern engine": engine,
    "shapkern engine, compiled": engine_compiled,
    "zero-input full forward": zero_input,
    "key mask, SDPA": key_mask,
    "pairs + dense mask, SDPA": pairs_dense_mask,
    "packed, torch varlen_attn": engine_torch_varlen,
    "pairs, FlexAttention": pairs_flex,
    "pairs + dense mask, torch.compile": pairs_dense_mask_compiled,
}
CUDA_ONLY = {
    "shapkern engine, compiled",
    "pairs, FlexAttention",
    "packed, torch varlen_attn",
    "pairs + dense mask, torch.compile",
}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why a method cannot run here, or None."""
    if name in CUDA_ONLY and device.type != "cuda":
        return "needs CUDA"
    if name == "packed, torch varlen_attn":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


# -- FLOPs and timing --------------------------------------------------------------------------


def packed_flops(model, coalitions) -> float:
    """design.md §5: depth · (24 D² s + 4 D s²) per coalition with s kept tokens, forward."""
    dim, depth = model.embed_dim, len(model.blocks)
    kept = coalitions.sum(-1).double() + model.num_prefix_tokens
    return float((depth * (24 * dim**2 * kept + 4 * dim * kept**2)).sum())


def gemm_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """Measured dense GEMM rate in TFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    stats = time_fn(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * size**3 / (stats["median_ms"] * 1e-3) / 1e12


def time_fn(fn, device: torch.device, *, warmup: int = 2, repeats: int = 5) -> dict:
    """Median, min and max wall time of fn() in ms (CUDA events on a GPU), and peak GPU memory."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        peak = None
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "peak_mib": peak,
    }


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; NaN anywhere gives inf."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


# -- environment and output --------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: torch.device) -> dict:
    """The hardware and software a result was measured on."""
    import timm
    import triton

    env = {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timm": timm.__version__,
        "shapkern": shapkern.__version__,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split("\n")[0]
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown"
    return env


def hardware_name(env: dict) -> str:
    return env.get("gpu") or f"{env['cpu']} ({env['cpu_threads']} threads)"


def results_dir(out: Path | None, device: str) -> Path:
    """``out``, or benchmarks/results/<date>-<device>/ by default."""
    return out or Path(__file__).parent / "results" / f"{datetime.date.today().isoformat()}-{device}"


def write_results(out: Path, stem: str, payload: dict, markdown: str) -> None:
    """Write stem.json and stem.md under out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_cpu_threads() -> None:
    """Use every core of the machine for intra-op parallelism unless the user chose otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
