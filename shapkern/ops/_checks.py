"""Argument checks and dtype rules shared by the reduction ops."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def num_words(num_players: int) -> int:
    return (num_players + 31) // 32


def check(ok: bool, op: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{op}: {message}")


def check_float(t: torch.Tensor, name: str, op: str) -> None:
    check(t.dtype in FLOAT_DTYPES, op, f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        check(t.device == ref.device, op, f"{name} is on {t.device} but {first} is on {ref.device}")


def check_num_players(num_players, op: str) -> None:
    """N must be a non-negative Python int (a float such as 5.0 would slice and shift wrongly)."""
    is_int = isinstance(num_players, int) and not isinstance(num_players, bool)
    check(is_int, op, f"num_players must be an int, got {type(num_players).__name__} {num_players!r}")
    check(num_players >= 0, op, f"num_players must be >= 0, got {num_players}")


def check_packed(packed: torch.Tensor, num_players: int, op: str) -> None:
    """Bit-packed coalitions (B, M, W) int32 with W >= ⌈N/32⌉ words."""
    check(packed.dim() == 3, op, f"packed must be 3-D (B, M, W), got shape {tuple(packed.shape)}")
    check(packed.dtype == torch.int32, op, f"packed must be int32 (bit-packed), got {packed.dtype}")
    check_num_players(num_players, op)
    check(
        packed.shape[2] >= num_words(num_players),
        op,
        f"packed has W={packed.shape[2]} words per coalition, too few for num_players={num_players}",
    )


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int, op: str) -> None:
    check(cu_seqlens.dtype == torch.int32, op, f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    check(
        cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 1,
        op,
        f"cu_seqlens must be 1-D (R+1,), got shape {tuple(cu_seqlens.shape)}",
    )
    if torch.compiler.is_compiling():
        return  # value checks need a host sync
    first, last = cu_seqlens[0], cu_seqlens[-1]
    monotone = (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    if bool((first == 0) & (last == num_tokens) & monotone):  # one sync
        return
    check(int(first) == 0, op, f"cu_seqlens[0] must be 0, got {int(first)}")
    check(
        int(last) == num_tokens,
        op,
        f"cu_seqlens[-1] must equal the number of tokens {num_tokens}, got {int(last)}",
    )
    check(False, op, "cu_seqlens must be non-decreasing")
