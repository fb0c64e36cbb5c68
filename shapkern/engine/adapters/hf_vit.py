"""Hugging Face transformers' vision transformers on the packed engine: ViT, DeiT, DINOv2, and the
CLIP and SigLIP image towers, bare or with their classifier or projection (transformers 5's modules).

The adapter calls the model's own modules on packed tokens: its patch embedding, class tokens and
position embeddings once per image, then each encoder layer's norms, q/k/v and output projections
(the engine's varlen attention in between), MLP, layer scale and dropout, then its final norm,
pooling and head per (image, coalition) row. Importing this module does not import transformers:
a model is claimed by the module and name of its class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
from torch import nn

from shapkern.engine.adapters.base import BlockPath, ModelAdapter, Output, Submodule, unsupported
from shapkern.engine.adapters.multihead import multihead_unsupported, packed_query_pool
from shapkern.packed import AttentionFn, PackPlan, first_tokens, segment_mean

__all__ = ["HFVisionTransformer"]

SUPPORTED = (
    "ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification(WithTeacher), "
    "Dinov2Model, Dinov2ForImageClassification, CLIPVisionModel(WithProjection), "
    "CLIPForImageClassification, SiglipVisionModel with its attention-pooling head and "
    "SiglipForImageClassification, as transformers 5 builds them, at their config's image size (no "
    "interpolate_pos_encoding), in eval mode or in train mode without attention dropout or drop path"
)


@dataclass(frozen=True)
class _Layout:
    """Where one transformers family keeps what the packed engine runs (transformers 5 names)."""

    layers: str  # path from the vision model to its layer list
    layer: str  # class name of a layer
    norms: tuple[str, str]  # the layer's norms before attention and before the MLP
    attention: str  # the layer's attention module (q_proj, k_proj, v_proj and ``out_proj``)
    out_proj: str
    scale: str  # the attention's softmax scale attribute
    attention_dropout: str  # the attention's dropout probability attribute
    branches: tuple[tuple[str, ...], tuple[str, ...]]  # the layer's modules on each residual branch
    prefix: tuple[str, ...]  # the embeddings' prefix token parameters, in sequence order
    final_norm: str
    own_embeddings: bool  # the embeddings module has no dropout: call it as it is
    interpolates: bool = False  # the model always passes positions through interpolate_pos_encoding


_VIT = _Layout(
    layers="layers",
    layer="ViTLayer",
    norms=("layernorm_before", "layernorm_after"),
    attention="attention",
    out_proj="o_proj",
    scale="scaling",
    attention_dropout="attention_dropout",
    branches=(("dropout",), ("dropout",)),
    prefix=("cls_token",),
    final_norm="layernorm",
    own_embeddings=False,
)
_CLIP = _Layout(
    layers="encoder.layers",
    layer="CLIPEncoderLayer",
    norms=("layer_norm1", "layer_norm2"),
    attention="self_attn",
    out_proj="out_proj",
    scale="scale",
    attention_dropout="dropout",
    branches=((), ()),
    prefix=("class_embedding",),
    final_norm="post_layernorm",
    own_embeddings=True,
)
# transformers.models module -> (layout, {class name: (attribute holding the vision model, "" for
# the model itself; the pooling; the head)}). Poolings: "class" the class token, "class_and_distillation"
# both prefix tokens, "class_and_mean" the class token and the patch mean, "mean" the patch mean, all
# after the final norm; "raw_mean" the patch mean before it; "attention" SigLIP's attention pooling.
MODELS = {
    "vit.modeling_vit": (
        _VIT,
        {"ViTModel": ("", "class", "pooler"), "ViTForImageClassification": ("vit", "class", "classifier")},
    ),
    "deit.modeling_deit": (
        replace(_VIT, layer="DeiTLayer", prefix=("cls_token", "distillation_token")),
        {
            "DeiTModel": ("", "class", "pooler"),
            "DeiTForImageClassification": ("deit", "class", "classifier"),
            "DeiTForImageClassificationWithTeacher": ("deit", "class_and_distillation", "teacher"),
        },
    ),
    "dinov2.modeling_dinov2": (
        replace(
            _VIT,
            layers="encoder.layer",
            layer="Dinov2Layer",
            norms=("norm1", "norm2"),
            branches=(("layer_scale1", "drop_path"), ("layer_scale2", "drop_path")),
            interpolates=True,
        ),
        {
            "Dinov2Model": ("", "class", ""),
            "Dinov2ForImageClassification": ("dinov2", "class_and_mean", "classifier"),
        },
    ),
    "clip.modeling_clip": (
        _CLIP,
        {
            "CLIPVisionModel": ("", "class", ""),
            "CLIPVisionModelWithProjection": ("vision_model", "class", "visual_projection"),
            "CLIPForImageClassification": ("vision_model", "raw_mean", "classifier"),
        },
    ),
    "siglip.modeling_siglip": (
        replace(_CLIP, layer="SiglipEncoderLayer", prefix=()),
        {
            "SiglipVisionModel": ("", "attention", ""),
            "SiglipForImageClassification": ("vision_model", "mean", "classifier"),
        },
    ),
}
PACKAGE = "transformers.models."


def _pair(size) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _branch(layer: Submodule, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    for name in names:
        x = getattr(layer, name)(x)
    return x


def _layer_forward(
    layout: _Layout, layer: Submodule, x: torch.Tensor, plan: PackPlan, attention: AttentionFn
) -> torch.Tensor:
    """One encoder layer on packed tokens (all these families are pre-norm): (T, D) -> (T, D)."""
    attn = getattr(layer, layout.attention)
    h = getattr(layer, layout.norms[0])(x)
    q, k, v = (proj(h).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, scale=getattr(attn, layout.scale))
    h = getattr(attn, layout.out_proj)(out.flatten(1))
    x = x + _branch(layer, layout.branches[0], h)
    return x + _branch(layer, layout.branches[1], layer.mlp(getattr(layer, layout.norms[1])(x)))


@cache
def _compiled_layer_forward():
    # As timm's compiled blocks (engine/blocks.py): layers share the code, their parameters are inputs.
    return torch.compile(_layer_forward)


class HFVisionTransformer(ModelAdapter):
    """A transformers ViT-family model: tokens of absent patches are dropped after the position
    embedding. Outputs: logits for classifiers, the projected image embedding for
    CLIPVisionModelWithProjection, the pooled output for bare models (ViTModel and DeiTModel without
    a pooler: the final-norm class token). ``output="pre_logits"`` gives the head's input (for the
    DeiT teacher model: the class and distillation features concatenated, (R, 2D))."""

    family = "Hugging Face ViT/DeiT/DINOv2/CLIP/SigLIP"

    @classmethod
    def claims(cls, model: Submodule) -> bool:
        module = type(model).__module__
        if not module.startswith(PACKAGE):
            return False
        _, classes = MODELS.get(module.removeprefix(PACKAGE), (None, {}))
        return type(model).__name__ in classes

    def __init__(self, model: Submodule):
        super().__init__(model)
        self.layout, classes = MODELS[type(model).__module__.removeprefix(PACKAGE)]
        backbone, self.pooling, self.head = classes[type(model).__name__]
        self.vision = getattr(model, backbone) if backbone else model
        config = self.vision.config
        self.image_size, patch = _pair(config.image_size), _pair(config.patch_size)
        self.grid = (self.image_size[0] // patch[0], self.image_size[1] // patch[1])
        self.channels = config.num_channels
        layers = self.layout.layers
        self.layers = self.vision.get_submodule(layers) if hasattr(self.vision, layers.split(".")[0]) else ()

    def check(self) -> None:
        layout, model = self.layout, self.model

        def fail(why: str) -> NotImplementedError:
            return unsupported(model, self.family, why, SUPPORTED)

        parts = ("embeddings", layout.final_norm, layout.layers.split(".")[0])
        if not all(hasattr(self.vision, name) for name in parts):
            raise fail(
                f"{type(self.vision).__name__} has no {'/'.join(parts)}: a module layout older than "
                "transformers 5's, which this adapter follows"
            )
        for layer in self.layers:
            attn = getattr(layer, layout.attention, None)
            if type(layer).__name__ != layout.layer or not all(
                hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", layout.out_proj)
            ):
                raise fail(
                    f"layer {type(layer).__name__} is not a {layout.layer} with q_proj/k_proj/v_proj/"
                    f"{layout.out_proj} attention as transformers 5 builds it"
                )
            if model.training and getattr(attn, layout.attention_dropout) > 0:
                raise fail("attention dropout in train mode")
            drop_path = getattr(layer, "drop_path", None)
            if model.training and drop_path is not None and not isinstance(drop_path, nn.Identity):
                raise fail("drop path (stochastic depth) in train mode")
        if self.pooling == "attention":
            head = getattr(self.vision, "head", None)
            if head is None:
                raise fail("SiglipVisionModel without its attention-pooling head (vision_use_head=False)")
            why = multihead_unsupported(head.attention)
            if why is not None:
                raise fail(f"a pooling head with {why}")

    @property
    def num_players(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.layout.prefix)

    @property
    def width(self) -> int:
        return self.vision.config.hidden_size

    @property
    def depth(self) -> int:
        return len(self.layers)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The model's embeddings without their dropout, which runs per coalition after packing."""
        got, want = tuple(images.shape[1:]), (self.channels, *self.image_size)
        if got != want:
            raise ValueError(
                f"{type(self.model).__name__} takes {'x'.join(map(str, want))} images (C x H x W, its "
                f"config's image_size), got {'x'.join(map(str, got))}: the packed engine does not "
                "interpolate position embeddings (interpolate_pos_encoding); resize the images"
            )
        height, width = got[1:]
        vision, emb = self.vision, self.vision.embeddings
        if self.layout.own_embeddings:  # CLIP, SigLIP: no dropout; CLIP's pre-norm is per token
            x = emb(images)
            pre_norm = getattr(vision, "pre_layrnorm", None)
            return x if pre_norm is None else pre_norm(x)
        x = emb.patch_embeddings(images.to(emb.patch_embeddings.projection.weight.dtype))
        prefix = [getattr(emb, name).expand(x.shape[0], -1, -1) for name in self.layout.prefix]
        x = torch.cat(prefix + [x], dim=1)
        if self.layout.interpolates:  # DINOv2: the identity at the config's square image size
            return x + emb.interpolate_pos_encoding(x, height, width)
        return x + emb.position_embeddings

    def blocks(
        self, x: torch.Tensor, plan: PackPlan, attention: AttentionFn, path: BlockPath
    ) -> torch.Tensor:
        if not self.layout.own_embeddings:
            x = self.vision.embeddings.dropout(x)
        layer_forward = _compiled_layer_forward() if path == "compiled" else _layer_forward
        for layer in self.layers:
            x = layer_forward(self.layout, layer, x, plan, attention)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.vision, self.layout.final_norm)(x)

    def _pooled(self, x: torch.Tensor, plan: PackPlan) -> torch.Tensor:
        """The head's input per row: (T, D) blocks' output -> (R, D) (or (R, 2D))."""
        pooling = self.pooling
        if pooling == "raw_mean":
            return segment_mean(x, plan)
        if pooling in ("class", "class_and_distillation"):
            count = 1 if pooling == "class" else 2
            return self.final_norm(first_tokens(x, plan, count)).flatten(1)
        x = self.final_norm(x)
        if pooling == "mean":
            return segment_mean(x, plan)
        if pooling == "class_and_mean":
            return torch.cat([first_tokens(x, plan, 1)[:, 0], segment_mean(x, plan)], dim=1)
        head = self.vision.head  # SigLIP: probe attention, then a residual MLP
        pooled = packed_query_pool(head.attention, head.probe.view(-1), x, plan)
        return pooled + head.mlp(head.layernorm(pooled))

    def pool_head(self, x: torch.Tensor, plan: PackPlan, output: Output) -> torch.Tensor:
        pooled = self._pooled(x, plan)
        if output == "pre_logits" or not self.head:
            return pooled
        if self.head == "teacher":  # DeiT: the mean of the class and distillation heads
            cls, dist = pooled.chunk(2, dim=1)
            return (self.model.cls_classifier(cls) + self.model.distillation_classifier(dist)) / 2
        if self.head == "pooler":  # ViTModel, DeiTModel: an optional dense layer on the class token
            pooler = self.vision.pooler
            return pooled if pooler is None else pooler(pooled.unsqueeze(1))
        return getattr(self.model, self.head)(pooled)
