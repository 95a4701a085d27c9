"""The segmentation pictures on a synthetic result (no model): legends in the exact class colours, outlines and the
side-by-side label map without any blending shift, `mask(name)`, and the demo grids' legends."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_goca.result import GoCASegmentation, boundaries, draw_legend, palette

H, W = 32, 40


def two_class(image: bool = True, **kw) -> GoCASegmentation:
    """ "sky" (class 0, red) on the left 3/5, "sea" (class 1, green) on the rest, "yellow thing" (class 2, yellow) in
    the lower left corner; the image is pure blue, so blending yellow over it reads teal."""
    labels = torch.zeros(H, W, dtype=torch.long)
    labels[:, 24:] = 1
    labels[20:, :8] = 2  # a third class in a corner, so the boundaries meet
    scores = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    picture = Image.fromarray(np.tile(np.array([0, 0, 255], np.uint8), (H, W, 1))) if image else None
    return GoCASegmentation(labels, scores, ["sky", "sea", "yellow thing"], image=picture, **kw)


def exact_colour_pixels(picture: np.ndarray, colour) -> int:
    return int((picture == np.asarray(colour, np.uint8)).all(-1).sum())


def test_mask_is_the_class_pixels_and_refuses_unknown_names():
    r = two_class()
    for k, name in enumerate(r.classes):
        m = r.mask(name)
        assert m.dtype == torch.bool and m.shape == (H, W)
        assert torch.equal(m, r.labels == r.classes.index(name)) and torch.equal(m, r.labels == k)
    assert int(r.mask("yellow thing").sum()) == 12 * 8
    with pytest.raises(ValueError, match=r"no class 'dog'.*\['sky', 'sea', 'yellow thing'\]"):
        r.mask("dog")


def test_palette_property_is_the_class_colours():
    r = two_class()
    assert np.array_equal(r.palette, palette(r.classes))
    assert np.array_equal(np.asarray(r.colorize()), r.palette[r.labels.numpy()])  # unchanged default: 1 px per label


@pytest.mark.parametrize("style", ["side-by-side", "outline", "blend"])
def test_overlay_has_a_legend_in_the_exact_colours_under_the_enlarged_picture(style):
    r = two_class()
    scale = 256 // max(H, W)  # small maps are enlarged to about 256 px before anything is drawn
    pic = r.overlay(style=style)
    panel_w = W * scale if style != "side-by-side" else 2 * W * scale + max(4, scale)
    assert pic.mode == "RGB" and pic.width >= panel_w and pic.height > H * scale + 14  # a legend row at least
    legend = np.asarray(pic)[H * scale :]
    for colour in r.palette:  # each class's swatch: a 14×14 square at the default size, its inside exactly coloured
        assert exact_colour_pixels(legend, colour) >= 12 * 12
    assert not r.overlay(style=style, legend=False).height > H * scale


def test_overlay_outlines_and_label_panel_keep_the_exact_class_colours():
    r = two_class()
    scale = 256 // max(H, W)
    pic = np.asarray(r.overlay(legend=False))
    labels = r.labels.numpy().repeat(scale, 0).repeat(scale, 1)
    exact = r.palette[labels]
    left, right = pic[:, : W * scale], pic[:, W * scale + max(4, scale) :]
    assert np.array_equal(right, exact)  # the label map beside the image: every pixel in its class colour
    rim = boundaries(labels, 2)
    assert rim.any() and not rim.all()
    assert np.array_equal(left[rim], exact[rim])  # outlines in the exact colours, no blending shift
    assert (left[~rim] == (0, 0, 255)).all()  # the image itself is left as it was elsewhere
    # The blend tints the regions (the old shift) but its outlines keep the exact colours too.
    blend = np.asarray(r.overlay(style="blend", legend=False))
    assert np.array_equal(blend[rim], exact[rim])
    assert not np.array_equal(blend[~rim], exact[~rim])
    assert np.array_equal(np.asarray(r.overlay(style="outline", legend=False, outline=0)), left * 0 + (0, 0, 255))


def test_overlay_without_an_image_is_the_label_map_with_its_legend():
    r = two_class(image=False)
    pic = np.asarray(r.overlay())
    scale = 256 // max(H, W)
    assert np.array_equal(pic[: H * scale, : W * scale], r.palette[r.labels.numpy()].repeat(scale, 0).repeat(scale, 1))
    assert pic.shape[0] > H * scale
    labelled = np.asarray(r.colorize(legend=True))
    assert np.array_equal(labelled, pic)


def test_overlay_refuses_unknown_styles():
    with pytest.raises(ValueError, match="style must be one of"):
        two_class().overlay(style="tint")


def test_absent_classes_are_named_in_the_legend():
    r = two_class(presence={"cat": 0.0})
    r.classes.append("cat")
    assert r._legend_names()[-1] == "cat (absent)"
    assert r._legend_names()[0] == f"sky ({100 * int(r.mask('sky').sum()) / (H * W):.0f}%)"


def test_heatmaps_keep_their_default_geometry_and_add_a_colour_bar_on_request():
    r = two_class()
    heat = r.heatmaps(cell=100)
    assert heat.size == (3 * 100, 80 + 16)  # 40×32 at cell 100: tiles 100×80 under 16-pixel titles
    with_bar = r.heatmaps(cell=100, legend=True)
    assert with_bar.width >= heat.width and with_bar.height > heat.height
    assert np.array_equal(np.asarray(with_bar)[: heat.height, : heat.width], np.asarray(heat))


def test_draw_legend_swatches_and_text_at_the_size_asked():
    colours = palette(["a", "b", "background"])
    small, large = (
        draw_legend(["a", "b", "background"], colours, 100),
        draw_legend(["a", "b", "background"], colours, 100, font_size=28),
    )
    assert large.height > small.height
    for colour in colours:
        assert exact_colour_pixels(np.asarray(large), colour) >= 26 * 26
    column = draw_legend(["a", "b", "background"], colours, 1000, vertical=True)
    row = draw_legend(["a", "b", "background"], colours, 1000)
    assert column.height > row.height  # one entry per line


def test_demo_grids_carry_a_legend_per_row():
    from diffusers_goca.toyworld.demo import segmentation_grid
    from diffusers_goca.toyworld.scenes import CLASS_NAMES, make_scene, scene_seeds

    examples = []
    for seed in scene_seeds("test", 2):
        scene = make_scene(seed)
        ids = np.array([scene.classes.index(CLASS_NAMES[v]) for v in scene.labels.ravel()]).reshape(scene.labels.shape)
        r = GoCASegmentation(torch.from_numpy(ids), torch.rand(len(scene.classes), 32, 32), scene.classes)
        examples.append((scene, {"goca": r}))
    with tempfile.TemporaryDirectory() as tmp:
        segmentation_grid(examples, ["goca"], f"{tmp}/grid.png")
        grid = np.asarray(Image.open(f"{tmp}/grid.png").convert("RGB"))
    cells = 3 * 128  # scene, ground truth, goca; each 32 px × 4
    assert grid.shape[1] > cells
    colours = palette(CLASS_NAMES)
    top = grid.shape[0] - 2 * 128
    for i, (scene, _) in enumerate(examples):
        key = grid[top + i * 128 : top + (i + 1) * 128, cells:]
        for name in scene.classes:
            assert exact_colour_pixels(key, colours[CLASS_NAMES.index(name)]) >= 12 * 12, name
