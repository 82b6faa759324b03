"""Pictures of what token merging did: which patches ended up in the same token (ToMe paper style)."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["merge_map"]

BORDER = (0, 0, 0)


def _to_rgb_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """PIL image, (H, W, 3) or (3, H, W) array/tensor -> (H, W, 3) uint8; floats outside [0, 1] are min-max scaled."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"image must be (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] == 1:
        arr = arr.repeat(3, axis=-1)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        lo, hi = arr.min(), arr.max()
        if lo < 0.0 or hi > 1.0:
            arr = (arr - lo) / max(hi - lo, 1e-12)
        arr = np.round(arr * 255.0).astype(np.uint8)
    return arr


def _infer_grid(num_sources: int) -> tuple[int, int]:
    """Smallest number of prefix tokens p such that num_sources - p is a square grid of patches."""
    for prefix in range(num_sources):
        side = math.isqrt(num_sources - prefix)
        if side * side == num_sources - prefix:
            return side, side
    raise ValueError(f"cannot infer a square patch grid from {num_sources} source tokens; pass grid=(rows, cols)")


def _palette(n: int) -> np.ndarray:
    """n distinct, bright (never black) colours."""
    colours = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        sat, val = (0.55, 0.95, 0.8)[i % 3], (0.95, 0.85, 1.0)[(i // 3) % 3]
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.asarray(colours, dtype=np.uint8).reshape(n, 3)


def merge_map(
    image: Image.Image | np.ndarray | torch.Tensor,
    sources: torch.Tensor | np.ndarray,
    path: str | Path,
    grid: tuple[int, int] | None = None,
    fill: str = "mean",
    borders: bool = True,
    cell: int | None = None,
) -> Image.Image:
    """Write a PNG where each merged group of patches has one colour; returns the picture.

    sources: (N', N0) or (1, N', N0) from a forward with `track_sources=True`; its first
    N0 - rows*cols columns are prefix tokens (CLS, ...) and are left out, as are output rows
    holding no patch. grid: (rows, cols) of patches, inferred for a square grid if None.
    fill: "mean" (each group's mean image colour) or "distinct" (one palette colour per group).
    borders: draw 1-pixel black lines between groups. cell: pixels per patch side.
    """
    if fill not in ("mean", "distinct"):
        raise ValueError(f"fill must be 'mean' or 'distinct', got {fill!r}")
    src = sources.detach().cpu().float().numpy() if isinstance(sources, torch.Tensor) else np.asarray(sources, float)
    if src.ndim == 3 and src.shape[0] == 1:
        src = src[0]
    if src.ndim != 2:
        raise ValueError(f"sources must be (N', N0) for one image, got shape {src.shape}")
    rows, cols = _infer_grid(src.shape[1]) if grid is None else grid
    prefix = src.shape[1] - rows * cols
    if prefix < 0:
        raise ValueError(f"grid {rows}x{cols} needs {rows * cols} patch sources, sources has {src.shape[1]} columns")
    patches = src[:, prefix:] > 0  # (N', rows*cols)
    owners = patches.sum(axis=0)
    if not (owners == 1).all():
        raise ValueError(
            f"every patch must belong to exactly one token; owner counts range {owners.min()}..{owners.max()}"
        )
    token_of_patch = patches.argmax(axis=0)  # (rows*cols,)
    groups, group_of_patch = np.unique(token_of_patch, return_inverse=True)
    group_grid = group_of_patch.reshape(rows, cols)

    rgb = _to_rgb_array(image)
    if cell is None:
        cell = max(4, min(rgb.shape[0] // rows, rgb.shape[1] // cols))
    resized = Image.fromarray(rgb).resize((cols * cell, rows * cell), Image.Resampling.BILINEAR)
    resized = np.asarray(resized, dtype=np.float64)  # (rows*cell, cols*cell, 3)
    if fill == "mean":
        cell_means = resized.reshape(rows, cell, cols, cell, 3).mean(axis=(1, 3)).reshape(-1, 3)  # (rows*cols, 3)
        sums = np.zeros((len(groups), 3))
        np.add.at(sums, group_of_patch, cell_means)
        colours = np.round(sums / np.bincount(group_of_patch)[:, None]).astype(np.uint8)
    else:
        colours = _palette(len(groups))

    pixel_groups = np.kron(group_grid, np.ones((cell, cell), dtype=np.int64))  # (rows*cell, cols*cell)
    out = colours[pixel_groups]
    if borders:
        edge = np.zeros(pixel_groups.shape, dtype=bool)
        edge[:, :-1] |= pixel_groups[:, :-1] != pixel_groups[:, 1:]
        edge[:-1, :] |= pixel_groups[:-1, :] != pixel_groups[1:, :]
        out[edge] = BORDER
    picture = Image.fromarray(out)
    picture.save(Path(path), format="PNG")
    return picture
