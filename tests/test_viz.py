import itertools

import matplotlib.image
import numpy as np
import pytest
import torch

from shapkern.explainers.viz import patch_map, plot_curves, plot_grid, plot_heatmap


def png_shape(path):
    assert path.stat().st_size > 1000
    return matplotlib.image.imread(path).shape[:2]


def test_heatmap_png_has_the_expected_size(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "heat.png"
    plot_heatmap(torch.randn(3, 32, 32), torch.randn(16), path, size=(4, 3), dpi=50, title="class 3")
    assert png_shape(path) == (150, 200)
    plot_heatmap(torch.randn(1, 8, 8), torch.zeros(4), tmp_path / "flat.png")  # φ = 0: no division by 0
    assert png_shape(tmp_path / "flat.png") == (320, 400)


def test_grid_and_curves_png(tmp_path):
    torch.manual_seed(0)
    plot_grid(torch.randn(5, 1, 8, 8), torch.randn(5, 4), tmp_path / "grid.png", ncols=3, cell=1.0, dpi=40)
    assert png_shape(tmp_path / "grid.png") == (80, 120)  # 2 rows x 3 cols of 40 px
    curves = torch.rand(4, 17)
    plot_curves({"exact": curves, "kernel": curves.flip(1)}, curves[0], tmp_path / "curves.png", dpi=50)
    assert png_shape(tmp_path / "curves.png") == (160, 400)


def test_patch_map_is_centred_and_checks_the_grid():
    phi = torch.tensor([1.0, -2.0, 3.0, 0.0])
    np.testing.assert_array_equal(patch_map(phi, (4, 4))[:2, :2], np.ones((2, 2)))
    assert patch_map(phi, (4, 4))[3, 0] == 3.0
    with pytest.raises(ValueError, match="do not fill a 3x3"):
        patch_map(phi, (6, 6), grid=(3, 3))


def drawn(fig):
    """The figure drawn on an Agg canvas, and its renderer (for the extents of its artists)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_grid_titles_fit_their_panels_and_the_caption_says_what_the_colours_mean():
    torch.manual_seed(0)
    titles = [f"pred pattern{i}, true pattern{i}" for i in range(4)]  # evidence's class names
    fig = plot_grid(torch.randn(4, 3, 32, 32), torch.randn(4, 16), titles=titles)
    renderer = drawn(fig)
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(boxes) == 4 and all(left.x1 < right.x0 for left, right in itertools.pairwise(boxes))
    caption = fig.get_supxlabel()
    assert "red: the patch raises" in caption and "blue: lowers it" in caption and "own scale" in caption
    shared = plot_grid(torch.randn(2, 1, 8, 8), torch.randn(2, 4), shared_scale=True, caption="mine")
    assert shared.get_supxlabel() == "mine"
