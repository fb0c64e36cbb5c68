"""Pictures of explanations (matplotlib, no pyplot state: safe in scripts, servers and tests).

Every ``plot_*`` returns a :class:`matplotlib.figure.Figure` and, given ``path``, writes a PNG of
exactly ``size`` inches × ``dpi`` pixels. φ maps use a diverging colormap centred at 0: red
patches raise the class's logit, blue ones lower it; every figure says so in its colorbar or caption.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

__all__ = ["display_image", "draw_heatmap", "patch_map", "plot_curves", "plot_grid", "plot_heatmap"]

CMAP = "RdBu_r"
COLOURS = "red: the patch raises the logit of the class explained, blue: lowers it"


def display_image(image: torch.Tensor) -> np.ndarray:
    """A (C, H, W) tensor as a displayable array in [0, 1]: (H, W) for one channel, else (H, W, 3)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (C, H, W) with 1 or 3 channels, got {tuple(image.shape)}")
    x = image.detach().double().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def patch_map(phi: torch.Tensor, size: tuple[int, int], grid: tuple[int, int] | None = None) -> np.ndarray:
    """φ (N,) on a patch grid (default square), upsampled to the image size (H, W) by repetition."""
    phi = phi.detach().double().cpu().reshape(-1)
    if grid is None:
        side = round(phi.numel() ** 0.5)
        grid = (side, side)
    if grid[0] * grid[1] != phi.numel():
        raise ValueError(f"{phi.numel()} attributions do not fill a {grid[0]}x{grid[1]} patch grid")
    if size[0] % grid[0] or size[1] % grid[1]:
        raise ValueError(f"an image of {size[0]}x{size[1]} does not split into a {grid[0]}x{grid[1]} grid")
    cells = phi.view(grid)
    return cells.repeat_interleave(size[0] // grid[0], 0).repeat_interleave(size[1] // grid[1], 1).numpy()


def draw_heatmap(ax, image: torch.Tensor, phi: torch.Tensor, *, grid=None, alpha=0.6, vlim=None, title=None):
    """Draw φ (N,) over image (C, H, W) on a matplotlib Axes; returns the heatmap's AxesImage.

    The image is drawn in full; each patch's colour is as opaque as its |φ| is large relative to
    ``vlim`` (at most ``alpha``), so patches that barely matter leave the image visible.
    """
    shown = display_image(image)
    values = patch_map(phi, shown.shape[:2], grid)
    vlim = float(np.abs(values).max()) if vlim is None else float(vlim)
    vlim = vlim if vlim > 0 else 1e-12
    ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, interpolation="nearest")
    opacity = alpha * np.clip(np.abs(values) / vlim, 0.0, 1.0) ** 0.5
    heat = ax.imshow(
        values, cmap=CMAP, norm=TwoSlopeNorm(0.0, -vlim, vlim), alpha=opacity, interpolation="nearest"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return heat


def _save(fig: Figure, path, dpi: int) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


def plot_heatmap(
    image: torch.Tensor,
    phi: torch.Tensor,
    path=None,
    *,
    grid: tuple[int, int] | None = None,
    title: str | None = None,
    size: tuple[float, float] = (4.0, 3.2),
    dpi: int = 100,
    alpha: float = 0.6,
) -> Figure:
    """φ of one class (N,) over one image (C, H, W), with a colorbar centred at 0."""
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")  # keeps the colorbar's label inside
    ax = fig.add_subplot()
    heat = draw_heatmap(ax, image, phi, grid=grid, alpha=alpha, title=title)
    _colorbar(fig, heat, ax, "φ (red raises the class's logit)")
    return _save(fig, path, dpi)


def _colorbar(fig: Figure, heat, ax, label: str) -> None:
    bar = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    if bar.solids is not None:  # the bar shows the colours at full strength, not the patches' opacity
        bar.solids.set_alpha(1.0)


def _chars(width_in: float, fontsize: float) -> int:
    """Characters that fit ``width_in`` inches at ``fontsize`` points (0.6 em: a wide average glyph)."""
    return max(8, int(width_in * 72 / (0.6 * fontsize)))


def _title_lines(title: str, width_in: float, fontsize: float) -> str:
    """A panel title broken into lines that fit the panel (at ", " first, then at spaces), so that
    neighbouring titles do not run into each other."""
    chars = _chars(width_in, fontsize)
    if len(title) <= chars:
        return title
    return "\n".join(line for part in title.split(", ") for line in textwrap.wrap(part, chars))


def plot_grid(
    images: torch.Tensor,
    phi: torch.Tensor,
    path=None,
    *,
    titles: list[str] | None = None,
    grid: tuple[int, int] | None = None,
    ncols: int = 8,
    cell: float = 1.6,
    dpi: int = 100,
    shared_scale: bool = False,
    caption: str | None = None,
) -> Figure:
    """Heatmaps of a batch: images (B, C, H, W), φ (B, N) for one class each, one colorbar and a
    caption saying what the colours mean.

    The figure is ``min(B, ncols) * cell`` × ``rows * cell`` inches. With ``shared_scale`` every
    panel uses the batch's largest |φ| and the colorbar is in φ's units; otherwise each panel is
    scaled by its own largest |φ| (a symmetric scale per image) and the colorbar reads as that
    fraction. ``caption`` replaces the default one (the colours and the scale). Titles wider than a
    panel are broken into lines.
    """
    batch = images.shape[0]
    if phi.shape[0] != batch:
        raise ValueError(f"{batch} images but {phi.shape[0]} attribution maps")
    cols = min(batch, ncols)
    rows = -(-batch // cols)
    fig = Figure(figsize=(cols * cell, rows * cell), dpi=dpi, layout="constrained")
    scale = phi.detach().abs().amax() if shared_scale else phi.detach().abs().flatten(1).amax(1)
    axes, heat = [], None
    for b in range(rows * cols):
        ax = fig.add_subplot(rows, cols, b + 1)
        axes.append(ax)
        if b >= batch:
            ax.axis("off")
            continue
        values = phi[b].reshape(-1) if shared_scale else phi[b].reshape(-1) / scale[b].clamp(min=1e-12)
        vlim = float(scale) if shared_scale else 1.0
        title = _title_lines(titles[b], cell, 8) if titles else None
        heat = draw_heatmap(ax, images[b], values, grid=grid, vlim=vlim, title=title)
    if heat is not None:
        _colorbar(fig, heat, axes, "φ" if shared_scale else "φ / the image's largest |φ|")
        if caption is None:
            strength = (
                "one scale for all images"
                if shared_scale
                else "each image on its own scale (±1: its largest |φ|)"
            )
            caption = f"{COLOURS}; {strength}"
        fig.supxlabel(textwrap.fill(caption, _chars(cols * cell, 7)), fontsize=7)
    return _save(fig, path, dpi)


def _curves(curves) -> dict:
    if isinstance(curves, torch.Tensor):
        curves = {"": curves}
    out = {}
    for label, curve in curves.items():
        curve = torch.as_tensor(curve).detach().double().cpu()
        out[label] = curve.mean(0) if curve.dim() == 2 else curve.reshape(-1)
    return out


def plot_curves(
    insertion,
    deletion,
    path=None,
    *,
    ylabel: str = "probability of the class",
    size: tuple[float, float] = (8.0, 3.2),
    dpi: int = 100,
) -> Figure:
    """Insertion and deletion curves side by side, averaged over images, AUC in the legend.

    Args:
        insertion, deletion: (N+1,) or (B, N+1) curves (from ``metrics.insertion_deletion``), or
            dicts {label: curve} to compare methods.
    """
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    for index, (name, curves) in enumerate((("insertion", insertion), ("deletion", deletion))):
        ax = fig.add_subplot(1, 2, index + 1)
        for label, curve in _curves(curves).items():
            x = np.linspace(0, 1, curve.numel())
            auc = float(torch.trapezoid(curve, dx=1 / (curve.numel() - 1)))
            ax.plot(x, curve.numpy(), label=f"{label} (AUC {auc:.3f})".strip())
        ax.set_xlabel(f"fraction of patches {'inserted' if name == 'insertion' else 'deleted'}")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, dpi)
