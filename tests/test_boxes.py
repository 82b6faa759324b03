"""Box machinery: boxes follow the image processor's geometry; patch labels on the processed grid."""

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil, ViTImageProcessorPil
from transformers.image_utils import PILImageResampling

from leanvlp.processing.boxes import (
    BOX_TOLERANCE,
    clip_box,
    geometry_from_image_processor,
    is_text_relevant,
    names_to_ids,
    patch_labels_from_boxes,
    transform_boxes,
    validate_boxes,
)


def _marked(labels_row: np.ndarray, grid: int) -> set[tuple[int, int]]:
    return {(int(i) // grid, int(i) % grid) for i in np.flatnonzero(labels_row)}


def test_worked_example_224_px_16_px_patches():
    ip = ViTImageProcessorPil(size={"height": 224, "width": 224})
    geo = geometry_from_image_processor(ip, 224, 224)
    boxes = transform_boxes(validate_boxes([[0, 0, 32, 32]], 224, 224), geo)
    labels = patch_labels_from_boxes(boxes, geo.out_height, geo.out_width, 16)
    assert labels.shape == (1, 196)
    assert _marked(labels[0], 14) == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_min_fraction_controls_overlap():
    # box [0, 20) x [0, 20): patch (0,0) fully, (0,1)/(1,0) 25%, (1,1) 6.25%
    boxes = np.array([[0.0, 0.0, 20.0, 20.0]])
    assert _marked(patch_labels_from_boxes(boxes, 64, 64, 16)[0], 4) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert _marked(patch_labels_from_boxes(boxes, 64, 64, 16, min_fraction=0.2)[0], 4) == {(0, 0), (0, 1), (1, 0)}
    assert _marked(patch_labels_from_boxes(boxes, 64, 64, 16, min_fraction=0.5)[0], 4) == {(0, 0)}
    with pytest.raises(ValueError, match="min_fraction"):
        patch_labels_from_boxes(boxes, 64, 64, 16, min_fraction=1.5)


@pytest.mark.parametrize("height,width", [(320, 480), (500, 300)])
def test_labels_follow_resize_then_center_crop(height, width):
    """Paint the box white, run the real processor, and compare lit patches with the labels."""
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
        resample=PILImageResampling.NEAREST, do_normalize=False,
    )
    patch = 8
    rng = np.random.default_rng(0)
    survived = 0
    for _ in range(6):
        w, h = rng.integers(width // 8, width // 3), rng.integers(height // 8, height // 3)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        canvas[y : y + h, x : x + w] = 255
        pixels = ip(Image.fromarray(canvas), return_tensors="np")["pixel_values"][0, 0]  # (64, 64)
        geo = geometry_from_image_processor(ip, height, width)
        assert pixels.shape == (geo.out_height, geo.out_width)
        box = transform_boxes(validate_boxes([[x, y, w, h]], height, width), geo)
        # processed box edges must agree with the painted pixels to within one pixel (nearest rounding)
        lit_y, lit_x = np.nonzero(pixels > 0.5)
        if len(lit_y):
            assert abs(lit_x.min() - box[0, 0]) <= 1 and abs(lit_x.max() + 1 - box[0, 2]) <= 1
            assert abs(lit_y.min() - box[0, 1]) <= 1 and abs(lit_y.max() + 1 - box[0, 3]) <= 1
        # a 1-pixel edge shift changes a patch's coverage by at most 2 / 8 (two edges, 8 px patches)
        labels = patch_labels_from_boxes(box, 64, 64, patch, min_fraction=0.3)[0].reshape(8, 8)
        lit = pixels.reshape(8, patch, 8, patch).mean(axis=(1, 3))  # fraction of lit pixels per patch
        assert np.all(lit[labels] > 0.3 - 0.25), "a labelled patch holds (almost) no box pixel"
        assert np.all(lit[~labels] < 0.3 + 0.25), "an unlabelled patch is substantially covered"
        survived += int(labels.any())
    assert survived >= 3  # most random boxes survive the crop, so the checks above are not vacuous


def test_box_cropped_away_gets_no_patches():
    ip = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    geo = geometry_from_image_processor(ip, 100, 200)  # resized to 64 x 128, crop keeps x in [32, 96)
    assert (geo.top, geo.left, geo.out_height, geo.out_width) == (0, 32, 64, 64)
    box = transform_boxes([[0, 10, 40, 40]], geo)  # x in [0, 25.6) after resize: cropped away
    assert not patch_labels_from_boxes(box, 64, 64, 16).any()


@pytest.mark.parametrize(
    "box,match",
    [([10, 10, 0, 5], "has zero or negative area"), ([90, 10, 20, 5], "lies outside the 100x100 image by 10 px"),
     ([-1, 0, 5, 5], "lies outside the 100x100 image by 1 px"), ([0, 0, float("inf"), 5], "is not 4 finite")],
)
def test_bad_boxes_raise_naming_the_box(box, match):
    with pytest.raises(ValueError, match=r"^boxes\[0\] " + match) as info:
        validate_boxes([box], 100, 100)
    assert str(info.value).endswith(f"(value {[float(v) for v in box]}, xywh)")


# The worked numbers of the one box rule (the same in tests/test_data_schema.py, test_data_coco.py, test_bad_input.py)
WITHIN = [-0.25, 10.0, 20.0, 54.375]  # 0.25 px out on the left, 0.375 px out at the bottom of a 64x64 image
WITHIN_CLIPPED = [0.0, 10.0, 19.75, 54.0]
BEYOND = [50.0, 10.0, 14.625, 5.0]  # 0.625 px out on the right


def test_one_box_rule_clips_within_the_tolerance_and_rejects_beyond():
    assert BOX_TOLERANCE == 0.5
    assert clip_box(WITHIN, 64, 64) == WITHIN_CLIPPED
    assert validate_boxes([WITHIN, [1.0, 2.0, 3.0, 4.0]], 64, 64).tolist() == [WITHIN_CLIPPED, [1.0, 2.0, 3.0, 4.0]]
    assert clip_box([0.1, 0.2, 63.9, 63.8], 64, 64) == [0.1, 0.2, 63.9, 63.8]  # inside: exactly unchanged
    assert clip_box([0.0, 0.0, 64.5, 64.0], 64, 64) == [0.0, 0.0, 64.0, 64.0]  # exactly at the tolerance
    with pytest.raises(ValueError, match=r"^lies outside the 64x64 image by 0.625 px \(tolerance 0.5 px\)$"):
        clip_box(BEYOND, 64, 64)
    with pytest.raises(ValueError, match="no area inside"):
        clip_box([64.25, 3.0, 0.25, 2.0], 64, 64)  # within the tolerance but entirely outside


def test_text_relevance_whole_words_and_synonyms():
    assert is_text_relevant("dog", "A Dog runs on the grass.")
    assert not is_text_relevant("cat", "a catalogue on a table")
    assert is_text_relevant("traffic light", "the traffic  light is red")
    assert is_text_relevant("person", "a man rides a horse", {"person": ["man", "woman"]})
    assert not is_text_relevant("person", "a horse", {"person": ["man"]})


def test_unknown_label_raises_naming_it():
    assert names_to_ids(["b", "a"], ["a", "b"], "object_classes") == [1, 0]
    with pytest.raises(ValueError, match="object_classes.*'zebra'"):
        names_to_ids(["zebra"], ["a", "b"], "object_classes")
