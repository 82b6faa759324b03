"""The row schema: the validator accepts good rows, rejects each kind of bad row naming the field; RGB conversion."""

import io
import re

import numpy as np
import PIL.Image
import pytest
from datasets import Dataset

from leanvlp.data import FEATURES, to_rgb, validate_row
from leanvlp.data.schema import check_utf8, clip_row_boxes


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
    ("boxes[1]", "outside the 40x30 image by 0.625 px (tolerance 0.5 px)",
     {"boxes": [[0.0, 0.0, 10.0, 10.0], [30.0, 20.0, 10.625, 10.0]]}),
    ("captions[0]", r"lone surrogate '\ud800' at character 6", {"captions": ["a red \ud800 circle"]}),
    ("questions[0]", "lone surrogate", {"questions": ["what \udfff?"]}),
    ("answers[0][9]", "lone surrogate", {"answers": [["red"] * 9 + ["\ud800"]]}),
    ("box_labels[1]", "lone surrogate", {"box_labels": ["circle", "squ\udc80re"]}),
    ("box_attributes[0][1]", "lone surrogate", {"box_attributes": [["red", "\ud83d"], ["blue"]]}),
]


@pytest.mark.parametrize("field,why,change", BAD_ROWS, ids=[f"{f}-{w}" for f, w, _ in BAD_ROWS])
def test_bad_rows_are_rejected_naming_field_sample_and_reason(field, why, change):
    row = {**good_row(), **change}
    with pytest.raises(ValueError) as info:
        validate_row(row, index=5)
    message = str(info.value)
    # the shared style: <Component>: <field> <what is wrong> (sample <id>, value <v>)
    assert message.startswith(f"validate_row: {field} "), message
    assert why in message and re.search(r"\(sample .* at index 5, value .*\)$", message), message


def test_surrogate_message_shows_the_value_escaped():
    with pytest.raises(ValueError) as info:
        validate_row({**good_row(), "captions": ["ok", "a red \ud800 circle"]}, index=2)
    assert str(info.value) == ("validate_row: captions[1] contains a lone surrogate '\\ud800' at character 6 "
                               "(sample 'img-1' at index 2, value 'a red \\ud800 circle')")
    str(info.value).encode("utf-8")  # the message itself is printable


def test_boxes_within_the_tolerance_pass_and_clip_like_the_processor():
    """Same worked numbers as tests/test_boxes.py: 40x30 image, boxes 0.25 / 0.375 px out."""
    row = {**good_row(), "boxes": [[-0.25, 10.0, 20.0, 20.375], [30.0, 20.0, 10.0, 10.0]]}
    validate_row(row)
    assert clip_row_boxes(row, 30, 40) == [[0.0, 10.0, 19.75, 20.0], [30.0, 20.0, 10.0, 10.0]]


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


@pytest.mark.parametrize("data,line,offset,byte", [
    (b"ok\nfine\nbad \xff here\n", 3, 12, "0xff"),
    (b"a\n" * 2**19 + b"x" * 5 + b"\xc3(", 2**19 + 1, 2**20 + 5, "0xc3"),  # in the second 1 MiB read chunk
    (b"a\n" * (2**19 - 1) + b"x\xc3(", 2**19, 2**20 - 1, "0xc3"),  # the bad pair split over the two chunks
    (b"\n" + b"y" * (2**20 - 2) + b"\xe2\x82", 2, 2**20 - 1, None),  # ends inside a 3-byte character
])
def test_check_utf8_names_the_file_the_line_and_the_byte(tmp_path, data, line, offset, byte):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        check_utf8(path, "load_hf_dataset", "source")
    head = f"load_hf_dataset: source {str(path)!r} is not valid UTF-8: "
    if byte is None:
        assert str(info.value) == head + f"it ends inside a multi-byte character (line {line}); re-save it as UTF-8"
    else:
        assert str(info.value) == head + f"byte {byte} at line {line} (byte offset {offset}); re-save it as UTF-8"
    path.write_bytes("caf\u00e9 \u20ac\n".encode() * 3)
    check_utf8(path, "load_hf_dataset", "source")  # valid UTF-8 passes
