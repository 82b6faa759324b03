"""The row schema: the validator accepts good rows, rejects each kind of bad row naming the field; RGB conversion."""

import io

import numpy as np
import PIL.Image
import pytest
from datasets import Dataset

from leanvlp.data import FEATURES, to_rgb, validate_row


def good_row() -> dict:
    return {
        "image": PIL.Image.new("RGB", (40, 30)),
        "image_id": "img-1",
        "captions": ["a red circle", "there is a red circle"],
        "boxes": [[0.0, 0.0, 10.0, 10.0], [30.0, 20.0, 10.0, 10.0]],
        "box_labels": ["circle", "square"],
        "box_attributes": [["red", "small"], ["blue"]],
        "box_features": [[0.1, 0.2], [0.3, 0.4]],
        "questions": ["what color is the circle?"],
        "answers": [["red"] * 10],
    }


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_good_rows_pass():
    validate_row(good_row())
    minimal = {"image": PIL.Image.new("RGB", (8, 8)), "image_id": "x", "captions": ["c"]}
    validate_row(minimal)  # optional fields may be absent
    validate_row({**minimal, "boxes": [], "box_labels": [], "questions": [], "answers": [], "box_features": None})
    validate_row({**good_row(), "image": {"bytes": png_bytes(PIL.Image.new("L", (40, 30))), "path": None}})
    validate_row({**good_row(), "answers": [[]]})  # an unanswered question (test split)


BAD_ROWS = [
    ("captions", "missing", {"captions": []}),
    ("captions", "missing", {"captions": None}),
    ("captions[1]", "empty", {"captions": ["ok", "  "]}),
    ("captions[0]", "must be str", {"captions": [3]}),
    ("image_id", "non-empty str", {"image_id": ""}),
    ("image_id", "non-empty str", {"image_id": 7}),
    ("image", "missing", {"image": None}),
    ("image", "cannot be read", {"image": {"bytes": b"not an image", "path": None}}),
    ("box_labels", "2 labels for 1 boxes", {"boxes": [[0.0, 0.0, 5.0, 5.0]]}),
    ("boxes[1]", "outside the 40x30 image", {"boxes": [[0.0, 0.0, 10.0, 10.0], [35.0, 0.0, 10.0, 10.0]]}),
    ("boxes[0]", "outside", {"boxes": [[-3.0, 0.0, 10.0, 10.0], [30.0, 20.0, 10.0, 10.0]]}),
    ("boxes[1]", "zero or negative area", {"boxes": [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 0.0, 4.0]]}),
    ("boxes[0]", "zero or negative area", {"boxes": [[0.0, 0.0, 3.0, -1.0], [5.0, 5.0, 1.0, 4.0]]}),
    ("boxes[0]", "4 finite numbers", {"boxes": [[0.0, 0.0, 3.0], [5.0, 5.0, 1.0, 4.0]]}),
    ("boxes[0]", "4 finite numbers", {"boxes": [[0.0, float("nan"), 3.0, 3.0], [5.0, 5.0, 1.0, 4.0]]}),
    ("box_attributes", "one list per box", {"box_attributes": [["red"]]}),
    ("box_attributes[1]", "non-empty str", {"box_attributes": [["red"], "blue"]}),
    ("box_features", "one vector per box", {"box_features": [[0.1]]}),
    ("box_features", "differ in length", {"box_features": [[0.1], [0.1, 0.2]]}),
    ("answers", "0 answer lists for 1 questions", {"answers": []}),
    ("answers[0]", "11 answers; at most 10", {"answers": [["red"] * 11]}),
    ("answers[0]", "list of str", {"answers": [[1, 2]]}),
    ("questions[0]", "empty", {"questions": [""]}),
    ("row", "unknown fields", {"caption": "a"}),
]


@pytest.mark.parametrize("field,why,change", BAD_ROWS, ids=[f"{f}-{w}" for f, w, _ in BAD_ROWS])
def test_bad_rows_are_rejected_naming_field_sample_and_reason(field, why, change):
    row = {**good_row(), **change}
    with pytest.raises(ValueError) as info:
        validate_row(row, index=5)
    message = str(info.value)
    assert message.startswith(field + ":"), message
    assert why in message and "index 5" in message


def test_bad_image_type_is_a_type_error():
    with pytest.raises(TypeError, match="image"):
        validate_row({**good_row(), "image": np.zeros((4, 4, 3))})


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "1", "CMYK"])
def test_any_mode_becomes_rgb(mode):
    image = PIL.Image.new(mode, (6, 5))
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (6, 5)


def test_transparent_pixels_become_white_and_gray_keeps_its_value():
    rgba = PIL.Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (200, 10, 20, 255))
    out = to_rgb(rgba)
    assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [(255, 255, 255), (200, 10, 20)]
    gray = PIL.Image.new("L", (1, 1), 77)
    assert to_rgb(gray).getpixel((0, 0)) == (77, 77, 77)


def test_schema_decodes_grayscale_rgba_and_palette_images_as_rgb():
    images = [PIL.Image.new("L", (4, 4), 9), PIL.Image.new("RGBA", (4, 4), (1, 2, 3, 255)),
              PIL.Image.new("RGB", (4, 4), (5, 6, 7)).convert("P", palette=PIL.Image.Palette.ADAPTIVE)]
    rows = {name: [[] for _ in images] for name in FEATURES}
    rows["image"] = [{"bytes": png_bytes(im), "path": None} for im in images]
    rows["image_id"] = ["g", "a", "p"]
    rows["captions"] = [["c"]] * 3
    dataset = Dataset.from_dict(rows, features=FEATURES)
    decoded = [row["image"] for row in dataset]
    assert [im.mode for im in decoded] == ["RGB"] * 3
    assert [im.getpixel((0, 0)) for im in decoded] == [(9, 9, 9), (1, 2, 3), (5, 6, 7)]
