"""Box machinery for patch-level supervision (COPA's patch labels, the semantic heads' targets).

Pure functions on numpy arrays. Boxes arrive as COCO `xywh` in stored-image pixels; the image
processor resizes and centre-crops (and may pad) the image, so the boxes must follow exactly the
same geometry before they are compared with the processed patch grid. The geometry is read from
the image processor's own settings with the same size rules transformers applies.

Conventions
- A patch (row r, col c) covers pixels [c*p, (c+1)*p) x [r*p, (r+1)*p) of the processed image and
  has flat index r * grid_w + c (the order of a ViT patch embedding's `flatten(2)`).
- A box marks a patch when their intersection has positive area and covers at least
  `min_fraction` of the patch (default 0.0: any positive-area overlap). So at 224 px / 16 px
  patches a box over [0,32)x[0,32) marks exactly patches (0,0), (0,1), (1,0), (1,1).
- One box rule for loaders and processors (`clip_box`): a box may stick out of the image by at most
  `BOX_TOLERANCE` pixels (float rounding in annotations) and is then clipped to it; a box further
  out, or without positive area, is an error. Worked numbers: in a 64x64 image [-0.25, 10, 20,
  54.375] becomes [0, 10, 19.75, 54]; [50, 10, 14.625, 5] sticks out 0.625 px and is rejected.
- A box is text-relevant when its category name, or one of its configured synonyms, occurs in
  the caption as a whole word (case-insensitive; multi-word names allowed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

BOX_TOLERANCE = 0.5  # pixels a box may stick out of the image (float rounding in annotations); clipped away

__all__ = [
    "BOX_TOLERANCE",
    "Geometry",
    "clip_box",
    "geometry_from_image_processor",
    "validate_boxes",
    "transform_boxes",
    "patch_overlap_fraction",
    "patch_labels_from_boxes",
    "is_text_relevant",
    "names_to_ids",
]


@dataclass(frozen=True)
class Geometry:
    """Maps stored-image pixels to processed pixels: x' = x * scale_x - left, y' = y * scale_y - top."""

    in_height: int
    in_width: int
    scale_y: float
    scale_x: float
    top: int
    left: int
    out_height: int
    out_width: int


def _get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def _resized_size(size: Any, height: int, width: int) -> tuple[int, int]:
    """The (height, width) transformers' `resize` produces for this `size` (same rules, same rounding)."""
    shortest, longest = _get(size, "shortest_edge"), _get(size, "longest_edge")
    max_h, max_w = _get(size, "max_height"), _get(size, "max_width")
    h, w = _get(size, "height"), _get(size, "width")
    if shortest and longest:
        from transformers.image_transforms import get_size_with_aspect_ratio

        return tuple(get_size_with_aspect_ratio((height, width), shortest, longest))
    if shortest:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest, int(shortest * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if max_h and max_w:
        scale = min(max_h / height, max_w / width)
        return int(height * scale), int(width * scale)
    if h and w:
        return int(h), int(w)
    raise ValueError(f"image processor `size` must give height/width, shortest_edge or max_height/max_width; got {size}")


def geometry_from_image_processor(image_processor: Any, height: int, width: int) -> Geometry:
    """Geometry of resize -> centre crop -> pad as configured on a transformers image processor.

    Pixel-value rescale / normalise do not move pixels, so they do not appear here.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    new_h, new_w = height, width
    if getattr(image_processor, "do_resize", False):
        new_h, new_w = _resized_size(image_processor.size, height, width)
    scale_y, scale_x = new_h / height, new_w / width
    top = left = 0
    out_h, out_w = new_h, new_w
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        crop_h, crop_w = int(_get(crop, "height")), int(_get(crop, "width"))
        # transformers' centre crop: top = (H - h) // 2 (negative -> zero padding; same shift).
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        out_h, out_w = crop_h, crop_w
    if getattr(image_processor, "do_pad", False) and getattr(image_processor, "pad_size", None) is not None:
        # Padding goes to the bottom / right: no shift, only a bigger canvas.
        out_h, out_w = int(_get(image_processor.pad_size, "height")), int(_get(image_processor.pad_size, "width"))
    return Geometry(height, width, scale_y, scale_x, top, left, out_h, out_w)


def clip_box(box: Sequence[float], height: float, width: float) -> list[float]:
    """The one box rule: an xywh box within `BOX_TOLERANCE` px of the image is clipped to it, else ValueError.

    The error text says only what is wrong (callers add the field and sample). Sides that lie inside
    keep their exact value, so a box inside the image comes back unchanged.
    """
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError("is not 4 finite numbers [x, y, w, h]")
    if w <= 0 or h <= 0:
        raise ValueError("has zero or negative area")
    out = max(-x, -y, x + w - width, y + h - height)
    if out > BOX_TOLERANCE:
        raise ValueError(f"lies outside the {width:g}x{height:g} image by {out:g} px (tolerance {BOX_TOLERANCE:g} px)")
    if out <= 0:
        return [x, y, w, h]
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"lies outside the {width:g}x{height:g} image (no area inside it)")
    return [x0, y0, x1 - x0, y1 - y0]


def validate_boxes(boxes_xywh: np.ndarray, height: int, width: int, field: str = "boxes") -> np.ndarray:
    """(M, 4) float xywh clipped to the stored image by `clip_box`; a ValueError names the box and its value."""
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4) if len(boxes_xywh) else np.zeros((0, 4))
    out = np.empty_like(boxes)
    for i, box in enumerate(boxes):
        try:
            out[i] = clip_box(box, height, width)
        except ValueError as err:
            raise ValueError(f"{field}[{i}] {err} (value {box.tolist()}, xywh)") from None
    return out


def transform_boxes(boxes_xywh: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Stored-image xywh -> processed-image xyxy, clipped to the processed canvas. (M, 4) float."""
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    x0 = boxes[:, 0] * geometry.scale_x - geometry.left
    y0 = boxes[:, 1] * geometry.scale_y - geometry.top
    x1 = (boxes[:, 0] + boxes[:, 2]) * geometry.scale_x - geometry.left
    y1 = (boxes[:, 1] + boxes[:, 3]) * geometry.scale_y - geometry.top
    out = np.stack([x0, y0, x1, y1], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, geometry.out_width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, geometry.out_height)
    return out


def patch_overlap_fraction(boxes_xyxy: np.ndarray, height: int, width: int, patch_size: int) -> np.ndarray:
    """(M, P): the fraction of each patch's area covered by each box, P = (H // p) * (W // p)."""
    if height % patch_size or width % patch_size:
        raise ValueError(f"processed image {height}x{width} is not divisible by patch_size={patch_size}")
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    gh, gw = height // patch_size, width // patch_size
    starts_y = np.arange(gh) * patch_size  # (gh,)
    starts_x = np.arange(gw) * patch_size  # (gw,)
    over_y = np.clip(np.minimum(boxes[:, None, 3], starts_y + patch_size) - np.maximum(boxes[:, None, 1], starts_y), 0, None)
    over_x = np.clip(np.minimum(boxes[:, None, 2], starts_x + patch_size) - np.maximum(boxes[:, None, 0], starts_x), 0, None)
    area = over_y[:, :, None] * over_x[:, None, :]  # (M, gh, gw)
    return (area / float(patch_size * patch_size)).reshape(len(boxes), gh * gw)


def patch_labels_from_boxes(
    boxes_xyxy: np.ndarray, height: int, width: int, patch_size: int, min_fraction: float = 0.0
) -> np.ndarray:
    """(M, P) bool: box m marks patch i (positive-area overlap covering >= min_fraction of the patch)."""
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    frac = patch_overlap_fraction(boxes_xyxy, height, width, patch_size)
    return (frac > 0) & (frac >= min_fraction)


def is_text_relevant(category: str, caption: str, synonyms: Mapping[str, Sequence[str]] | None = None) -> bool:
    """True when the category name or one of its synonyms occurs in the caption as a whole word."""
    names = [category, *((synonyms or {}).get(category, ()))]
    text = caption.lower()
    for name in names:
        words = name.lower().split()
        if words and re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", text):
            return True
    return False


def names_to_ids(names: Iterable[str], vocab: Sequence[str], field: str) -> list[int]:
    """Vocabulary ids of `names`; an unknown name raises a ValueError naming it and the field."""
    index = {name: i for i, name in enumerate(vocab)}
    ids = []
    for name in names:
        if name not in index:
            raise ValueError(f"{field}: label {name!r} is not in the vocabulary ({len(vocab)} entries)")
        ids.append(index[name])
    return ids
