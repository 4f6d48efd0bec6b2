"""Attribute accuracy: does a generated scene show what its caption asks for? The organism's utility measure.

The background is read first: the median colour of the border pixels, named by the nearest of the three
backgrounds. Pixels that differ from that median colour (by more than ``foreground_distance`` in RGB) are the
foreground; each is assigned to the nearest of the six shape colours. A generated background is rarely the
exact training colour, so comparing pixels with the image's own background, not with the palette, keeps a
tinted background from being read as a shape. A shape is one blob: a captioned colour's shape is the largest
8-connected component of its pixels, so that stray edge pixels (antialiased blends of another shape with the
background, which the nearest-colour rule can name as a third colour) neither count as that shape nor stretch
its bounding box. From that:

- background: the nearest named background to the border's median colour;
- colour A / colour B: a blob of at least ``min_pixels`` pixels of that colour;
- relation: the centroids of the two colours' blobs stand in the captioned relation (by at least 2 pixels);
- shape A / shape B: how much of its bounding box the colour's blob fills (square ~1, circle ~0.79,
  triangle ~0.5).

The checker is validated on real training scenes (chapter 0) before it judges generations.
"""
from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from dori_utils.organism.data import BACKGROUNDS, RELATIONS, SHAPE_COLOURS, SHAPES

ATTRIBUTES = ("background", "colour_a", "colour_b", "relation", "shape_a", "shape_b")
_NAMES = list(SHAPE_COLOURS) + list(BACKGROUNDS)
_PALETTE = np.array([SHAPE_COLOURS[n] for n in SHAPE_COLOURS] + [BACKGROUNDS[n] for n in BACKGROUNDS], dtype=float)
_CAPTION = re.compile(
    rf"a (\w+) ({'|'.join(SHAPES)}) ({'|'.join(RELATIONS)}) a (\w+) ({'|'.join(SHAPES)}), ({'|'.join(BACKGROUNDS)}) background"
)


def parse_scene_caption(caption: str) -> dict:
    match = _CAPTION.fullmatch(caption)
    if not match:
        raise ValueError(f"Not a scene caption: {caption!r}")
    colour_a, shape_a, relation, colour_b, shape_b, background = match.groups()
    return dict(colour_a=colour_a, shape_a=shape_a, relation=relation, colour_b=colour_b, shape_b=shape_b,
                background=background)


def _shape_from_fill(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(ys) / box
    if fill > 0.88:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    components, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == int(np.argmax(sizes)) + 1


def check_scene(image: np.ndarray, caption: str, min_pixels: int = 12, foreground_distance: float = 60.0) -> dict[str, bool]:
    """Which of the caption's six attributes an H x W x 3 image (uint8, or float in [0, 1]) shows."""
    spec = parse_scene_caption(caption)
    pixels = np.asarray(image, dtype=float)
    if pixels.max() <= 1.0:
        pixels = pixels * 255
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    border_colour = np.median(border, axis=0)
    backgrounds = _PALETTE[len(SHAPE_COLOURS):]
    background = list(BACKGROUNDS)[int(np.argmin(((backgrounds - border_colour) ** 2).sum(-1)))]
    foreground = np.sqrt(((pixels - border_colour) ** 2).sum(-1)) > foreground_distance
    shape_palette = _PALETTE[: len(SHAPE_COLOURS)]
    labels = np.where(foreground, np.argmin(((pixels[..., None, :] - shape_palette) ** 2).sum(-1), axis=-1), -1)
    masks = {k: _largest_blob(labels == _NAMES.index(spec[k])) for k in ("colour_a", "colour_b")}
    present = {k: m.sum() >= min_pixels for k, m in masks.items()}
    result = {"background": background == spec["background"], **present}
    if all(present.values()):
        (ya, xa), (yb, xb) = [np.argwhere(masks[k]).mean(0) for k in ("colour_a", "colour_b")]
        relation = spec["relation"]
        result["relation"] = bool({"left of": xa < xb - 2, "right of": xa > xb + 2,
                                   "above": ya < yb - 2, "below": ya > yb + 2}[relation])
    else:
        result["relation"] = False
    for key, shape_key in (("colour_a", "shape_a"), ("colour_b", "shape_b")):
        result[shape_key] = bool(present[key]) and _shape_from_fill(masks[key]) == spec[shape_key]
    return {k: bool(result[k]) for k in ATTRIBUTES}


def attribute_accuracy(images, captions) -> dict[str, float]:
    """Share of images showing each attribute, and ``overall``: the mean over all six."""
    checks = [check_scene(np.asarray(img), cap) for img, cap in zip(images, captions)]
    accuracy = {k: float(np.mean([c[k] for c in checks])) for k in ATTRIBUTES}
    accuracy["overall"] = float(np.mean([accuracy[k] for k in ATTRIBUTES]))
    return accuracy
