"""Every way to evaluate coalitions that the benchmarks compare, and the packed-FLOP model.

Each method maps (model, images (B, C, H, W), paired coalitions bool (B, M, N)) to logits
(B, M, K) of a timm VisionTransformer, Eva or Beit (benchmarks/families.py). All but ``zero_input``
compute the same value function: the model on the kept tokens only (docs/design.md, "The game").

- shapkern: the packed engine on each fixed route (plain, compiled or fused blocks; varlen or pair
  attention), with fp8 GEMMs (forward only), with torch's varlen attention, and as a user calls it
  (``shapkern default``: the route its dispatch table picks).
- ``zero_input``: zero the pixels of absent patches, full forward (Captum / shap style).
- ``key_mask``: the full sequence per coalition with the absent keys masked (ViT-Shapley style).
- complementary pairs: coalitions 2i and 2i+1 split the patches, so one row
  [prefix, prefix, N patches] holds both with a block-diagonal mask; dense SDPA mask (eager and
  under torch.compile) or a FlexAttention document mask (timm's ViT Block only).
  :func:`pair_features` gives the rows' token features for users of the same layout (the
  ShapleyViT training-step benchmark).

:data:`METHODS` lists them in run order; :func:`unavailable_reason` says why one cannot run a
model here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import shapkern
from benchmarks import families
from shapkern.engine import adapter_for, masked_input_forward

__all__ = [
    "METHODS",
    "Method",
    "engine",
    "engine_compiled",
    "engine_compiled_pairs",
    "engine_default",
    "engine_fp8",
    "engine_fused",
    "engine_pairs",
    "engine_torch_varlen",
    "key_mask",
    "packed_flops",
    "pair_features",
    "pairs_dense_mask",
    "pairs_dense_mask_compiled",
    "pairs_flex",
    "torch_varlen",
    "unavailable_reason",
    "zero_input",
]


# -- shapkern ----------------------------------------------------------------------------------


def _route(blocks: str, attention: str):
    """The engine on one fixed route (block path, attention): the dispatch table is not consulted."""
    return functools.partial(
        shapkern.fused_coalition_forward, paired=True, blocks=blocks, attention=attention
    )


def engine(model, images, coalitions):
    """shapkern, plain path: all kept tokens packed flat, the model's own modules, Triton varlen attention."""
    return _route("plain", "varlen")(model, images, coalitions)


def engine_compiled(model, images, coalitions):
    """shapkern engine with its blocks under torch.compile (fused LayerNorm, GELU, residual adds)."""
    return _route("compiled", "varlen")(model, images, coalitions)


def engine_fused(model, images, coalitions):
    """shapkern engine with its fused kernels: residual add + LayerNorm, fc1 + bias + GELU (Triton)."""
    return _route("fused", "varlen")(model, images, coalitions)


def engine_pairs(model, images, coalitions):
    """shapkern engine, plain blocks, pair attention: each complementary pair one dense SDPA row."""
    return _route("plain", "pairs")(model, images, coalitions)


def engine_compiled_pairs(model, images, coalitions):
    """shapkern engine, blocks under torch.compile, pair attention (dense SDPA rows)."""
    return _route("compiled", "pairs")(model, images, coalitions)


def engine_default(model, images, coalitions):
    """shapkern as a user calls it: blocks and attention left to the engine (its dispatch table)."""
    return shapkern.fused_coalition_forward(model, images, coalitions, paired=True)


def engine_fp8(model, images, coalitions):
    """shapkern engine with fp8 (e4m3) GEMMs: qkv, proj, fc1, fc2 through torch._scaled_mm; forward only."""
    return shapkern.fused_coalition_forward(
        model, images, coalitions, paired=True, blocks="plain", precision="fp8", attention="varlen"
    )


def torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """torch.nn.attention.varlen.varlen_attn with shapkern's attention signature: (T, H, Dh) -> (T, H, Dh)."""
    from torch.nn.attention.varlen import varlen_attn

    if scale is not None:  # pre-scale q: the scale keyword is missing in older torch releases
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def engine_torch_varlen(model, images, coalitions):
    """All kept tokens packed flat as in the engine, torch.nn.attention.varlen.varlen_attn."""
    return shapkern.fused_coalition_forward(
        model, images, coalitions, paired=True, attention=torch_varlen, blocks="plain"
    )


# -- full sequences ----------------------------------------------------------------------------


def zero_input(model, images, coalitions):
    """Zero the pixels of absent patches, full forward (Captum/shap style)."""
    return masked_input_forward(model, images, coalitions, baseline="zeros", chunk_rows=1 << 30)


def key_mask(model, images, coalitions):
    """Full sequence per coalition, absent patches masked out of attention's keys and the pooling, SDPA
    (ViT-Shapley style)."""
    batch, num, players = coalitions.shape
    kept = coalitions.reshape(batch * num, players)
    keep = torch.cat([kept.new_ones(batch * num, model.num_prefix_tokens), kept], dim=1)
    feats = families.key_masked_features(model, images.repeat_interleave(num, 0), keep)
    return families.masked_head(model, feats, kept, slice(0, model.num_prefix_tokens)).view(batch, num, -1)


# -- complementary pairs -----------------------------------------------------------------------


def _pair_rows(model, images, coalitions):
    """One row per complementary pair: tokens (B·M/2, 2P + N, D), the group of each token and Eva's rope.

    Row layout [prefix of coalition 2i, prefix of coalition 2i+1, N patches]; group 0 holds the
    first prefix and the patches of coalition 2i, group 1 the rest. Returns (tokens, group bool
    (B·M/2, 2P + N), the rope of the N patches or None), from timm's own ``_pos_embed``.
    """
    embedded = model._pos_embed(model.patch_embed(images))
    tokens, rope = embedded if isinstance(embedded, tuple) else (embedded, None)  # Eva: (tokens, rope)
    prefix = model.num_prefix_tokens
    _, num, players = coalitions.shape
    rows = torch.cat([tokens[:, :prefix], tokens], dim=1).unsqueeze(1).expand(-1, num // 2, -1, -1)
    first = coalitions[:, 0::2].reshape(-1, players)
    group = torch.cat(
        [first.new_zeros(first.shape[0], prefix), first.new_ones(first.shape[0], prefix), ~first], 1
    )
    return model.norm_pre(rows.reshape(-1, *rows.shape[2:])), group, rope


def _dense_mask(group: torch.Tensor) -> torch.Tensor:
    """Block-diagonal attention mask (R, 1, L, L): tokens attend within their own coalition."""
    return (group.unsqueeze(2) == group.unsqueeze(1)).unsqueeze(1)


def pair_features(
    model: nn.Module, images: torch.Tensor, coalitions: torch.Tensor, extra_block: nn.Module | None = None
) -> torch.Tensor:
    """Final-norm token features of complementary-pair rows, dense block mask, SDPA.

    Args:
        model: a timm VisionTransformer or Eva.
        images: (B, C, H, W).
        coalitions: bool (B, M, N), coalitions 2i and 2i+1 complements.
        extra_block: a timm Block run after the final norm with the same mask (a ShapleyViT's
            ``head_block``), or None.

    Returns:
        (B·M/2, 2P + N, D): per row the prefix tokens of coalition 2i, those of coalition 2i+1,
        then the N patch tokens, each seen only by the tokens of its own coalition.
    """
    x, group, rope = _pair_rows(model, images, coalitions)
    mask = _dense_mask(group)
    x = model.norm(families.pair_blocks(model, x, rope, mask))
    return x if extra_block is None else extra_block(x, attn_mask=mask)


def _pair_heads(model, x, coalitions):
    """The heads of both coalitions of each pair row: (B·M/2, 2P + N, D) -> (B, M, K)."""
    prefix, (batch, num, players) = model.num_prefix_tokens, coalitions.shape
    first = coalitions[:, 0::2].reshape(-1, players)
    out = torch.stack(
        [
            families.masked_head(model, x, first, slice(0, prefix)),
            families.masked_head(model, x, ~first, slice(prefix, 2 * prefix)),
        ],
        dim=1,
    )
    return out.view(batch, num, -1)


def pairs_dense_mask(model, images, coalitions):
    """Complementary pairs packed in one row, dense block-diagonal mask, SDPA."""
    return _pair_heads(model, pair_features(model, images, coalitions), coalitions)


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
    x, group, _ = _pair_rows(model, images, coalitions)
    rows, length = group.shape
    block_mask = create_block_mask(
        lambda b, h, q, kv: group[b, q] == group[b, kv], rows, None, length, length, device=x.device
    )
    for block in model.blocks:
        x = _block_with_attention(block, x, lambda q, k, v: _compiled_flex(q, k, v, block_mask=block_mask))
    return _pair_heads(model, model.norm(x), coalitions)


_compiled_pairs = None


def pairs_dense_mask_compiled(model, images, coalitions):
    """pairs_dense_mask under torch.compile (default mode)."""
    global _compiled_pairs
    if _compiled_pairs is None:
        _compiled_pairs = torch.compile(pairs_dense_mask)
    return _compiled_pairs(model, images, coalitions)


# -- the method table --------------------------------------------------------------------------


def _no_score_bias(model: nn.Module) -> str | None:
    """Why torch's varlen_attn cannot run ``model``'s attention, or None."""
    if families.family(model) == "beit" and (
        model.rel_pos_bias is not None
        or any(block.attn.relative_position_bias_table is not None for block in model.blocks)
    ):
        return "torch's varlen_attn takes no score bias (Beit's relative position bias)"
    return None


@dataclass(frozen=True)
class Method:
    """One way to evaluate coalitions.

    Attributes:
        fn: (model, images, coalitions) -> (B, M, K).
        shapkern: runs shapkern's engine (the others are the alternatives it is compared with).
        cuda_only: needs a GPU (compiled or GPU-only kernels).
        game: ``"token dropping"`` or ``"zero input"``: the value function it computes.
        forward_only: has no backward (fp8 evaluation).
        tolerance: relative error it is held to against the fp32 reference, when not the
            model dtype's own (fp8 quantises every GEMM operand).
        block_path: the engine's block path it runs (``blocks=`` or fp8), for the adapter's
            ``block_paths``; None for the alternatives.
        model_unavailable: model -> why the method cannot run that model's family, or None.
    """

    fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    shapkern: bool = False
    cuda_only: bool = False
    game: str = "token dropping"
    forward_only: bool = False
    tolerance: float | None = None
    block_path: str | None = None
    model_unavailable: Callable[[nn.Module], str | None] | None = None

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()


# Methods that compile come last, so that a run cut short keeps the others.
METHODS = {
    "shapkern engine": Method(engine, shapkern=True, block_path="plain"),
    "shapkern engine, compiled": Method(
        engine_compiled, shapkern=True, cuda_only=True, block_path="compiled"
    ),
    "shapkern engine, fused kernels": Method(engine_fused, shapkern=True, cuda_only=True, block_path="fused"),
    "shapkern engine, pair attention": Method(engine_pairs, shapkern=True, block_path="plain"),
    "shapkern engine, compiled, pair attention": Method(
        engine_compiled_pairs, shapkern=True, cuda_only=True, block_path="compiled"
    ),
    # What a call gets (blocks and attention "auto"): the dispatch table in force, timed beside the rest.
    "shapkern default": Method(engine_default, shapkern=True),
    # e4m3 rounds each operand by up to 2^-4 relative: a few percent over a 12-block model. It runs on
    # the CPU too (torch._scaled_mm there), forward only: fp8 serves the forward-only ℓ_sv targets.
    "shapkern engine, fp8": Method(
        engine_fp8, shapkern=True, forward_only=True, tolerance=0.15, block_path="fp8"
    ),
    "zero-input full forward": Method(zero_input, game="zero input"),
    "key mask, SDPA": Method(key_mask),
    "pairs + dense mask, SDPA": Method(pairs_dense_mask, model_unavailable=families.pairs_unavailable),
    "packed, torch varlen_attn": Method(
        engine_torch_varlen, cuda_only=True, block_path="plain", model_unavailable=_no_score_bias
    ),
    "pairs, FlexAttention": Method(
        pairs_flex, cuda_only=True, model_unavailable=families.timm_block_unavailable
    ),
    "pairs + dense mask, torch.compile": Method(
        pairs_dense_mask_compiled, cuda_only=True, model_unavailable=families.pairs_unavailable
    ),
}


def _device_unavailable(method: Method, device: torch.device) -> str | None:
    """Why ``method`` cannot run on ``device`` or with this torch and shapkern, or None."""
    if method.cuda_only and device.type != "cuda":
        return "needs CUDA"
    parameters = inspect.signature(shapkern.fused_coalition_forward).parameters
    if method.fn is engine_fused and "blocks" not in parameters:
        return "this shapkern has no blocks='fused'"
    if method.fn is engine_fp8:
        if "precision" not in parameters:
            return "this shapkern has no precision='fp8'"
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            return "fp8 needs compute capability 8.9 or newer"
    if method.fn is engine_torch_varlen:
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def unavailable_reason(name: str, device: torch.device | str, model: nn.Module | None = None) -> str | None:
    """Why method ``name`` cannot run on ``device`` (and, given ``model``, that model), or None.

    The model's checks: the block paths its engine adapter runs, and the method's own
    ``model_unavailable``. A method can still raise NotImplementedError for a variant these checks
    do not see (say, blocks the fused kernels do not compute); benchmarks report that as unavailable.
    """
    method = METHODS[name]
    reason = _device_unavailable(method, torch.device(device))
    if reason is not None or model is None:
        return reason
    if method.block_path is not None:
        try:
            adapter = adapter_for(model)
        except NotImplementedError as error:
            return str(error)
        if method.block_path not in adapter.block_paths:
            return f"the engine runs {adapter.family} models with blocks {adapter.block_paths}"
    return method.model_unavailable(model) if method.model_unavailable else None


# -- FLOPs -------------------------------------------------------------------------------------


def packed_flops(model: nn.Module, coalitions: torch.Tensor) -> float:
    """Forward FLOPs of the blocks on the kept tokens only (docs/design.md, "Performance model").

    Per coalition with s = P + |S| kept tokens, each block costs 2 · (weights of its Linear
    layers) · s for the GEMMs plus 4 D s² for attention's two products (D the model width). For
    timm's ViT Block (qkv, proj, fc1, fc2 with MLP ratio 4) that is depth · (24 D² s + 4 D s²);
    for SwiGLU blocks (EVA-02) it counts the gate's GEMM too. coalitions: bool (B, M, N).
    """
    kept = coalitions.sum(-1).double() + model.num_prefix_tokens
    total = torch.zeros_like(kept)
    for block in model.blocks:
        gemm = sum(2 * m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear))
        total += gemm * kept + 4 * model.embed_dim * kept**2
    return float(total.sum())
