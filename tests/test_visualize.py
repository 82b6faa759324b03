"""merge_map: one colour per merged group, prefix (CLS) rows left out."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTModel

from leanvlp.modeling.token_merging import TokenMergingConfig
from leanvlp.modeling.vision_tower import TokenMergingVisionTower
from leanvlp.visualize import merge_map


def _colours(path) -> set[tuple[int, int, int]]:
    arr = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(c) for c in arr.tolist()}


def _hand_sources() -> torch.Tensor:
    # CLS + a 2x3 grid; groups: {CLS}, {p0, p1}, {p2}, {p3, p4, p5}
    return torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.float32,
    )


def test_distinct_fill_has_one_colour_per_group(tmp_path):
    path = tmp_path / "map.png"
    picture = merge_map(np.zeros((20, 30, 3), np.uint8), _hand_sources(), path, grid=(2, 3), fill="distinct",
                        borders=False, cell=5)
    assert picture.size == (15, 10) and Image.open(path).format == "PNG"
    assert len(_colours(path)) == 3  # the CLS row holds no patch
    arr = np.asarray(Image.open(path))
    assert (arr[0, 0] == arr[0, 9]).all() and (arr[0, 0] != arr[0, 10]).any()  # p0, p1 alike; p2 differs
    merge_map(np.zeros((20, 30, 3), np.uint8), _hand_sources(), path, grid=(2, 3), fill="distinct", cell=5)
    assert len(_colours(path)) == 3 + 1  # plus the border colour


def test_mean_fill_uses_each_groups_mean_image_colour(tmp_path):
    image = np.zeros((2, 3, 3), np.uint8)  # one pixel per patch, every patch its own colour
    image[0] = [[200, 0, 0], [0, 100, 0], [10, 20, 30]]
    image[1] = [[30, 30, 30], [60, 60, 60], [90, 90, 90]]
    path = tmp_path / "mean.png"
    merge_map(image, _hand_sources(), path, grid=(2, 3), borders=False, cell=1)
    arr = np.asarray(Image.open(path))
    assert arr[0, 0].tolist() == arr[0, 1].tolist() == [100, 50, 0]
    assert arr[0, 2].tolist() == [10, 20, 30]
    assert arr[1, 0].tolist() == [60, 60, 60]
    assert len(_colours(path)) == 3


def test_merge_map_of_a_real_forward(tmp_path):
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                       image_size=32, patch_size=8)
    tower = TokenMergingVisionTower(ViTModel(config).eval(), TokenMergingConfig(r=4))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = tower(pixels, track_sources=True)
    assert out.token_counts == [13, 9]
    path = tmp_path / "real.png"
    merge_map(pixels[0], out.sources, path, fill="distinct", borders=False)  # grid inferred: 17 = CLS + 4x4
    assert len(_colours(path)) == 8  # 9 tokens, the CLS token holds no patch


def test_merge_map_rejects_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="exactly one token"):
        merge_map(np.zeros((4, 4, 3), np.uint8), torch.ones(2, 5), tmp_path / "x.png", grid=(2, 2))
    with pytest.raises(ValueError, match="fill"):
        merge_map(np.zeros((4, 4, 3), np.uint8), _hand_sources(), tmp_path / "x.png", fill="rainbow")
    with pytest.raises(ValueError, match="grid 3x3"):
        merge_map(np.zeros((4, 4, 3), np.uint8), _hand_sources(), tmp_path / "x.png", grid=(3, 3))
