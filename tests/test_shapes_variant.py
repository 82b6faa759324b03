"""The shapes set's grid variant (text-guided merging's benchmark data): determinism, true pixels, boxes and answers;
the default set unchanged byte for byte."""

import hashlib
import io
import re

import numpy as np
import PIL.Image
import pytest
from datasets import Image

from leanvlp.data import FEATURES, make_shapes_dataset
from leanvlp.data.shapes import COLOURS, GAP, GRID_CELLS, SHAPES, generate_shapes_row

VARIANT = dict(layout="grid", questions="one_object_colour")


def digest(dataset) -> str:
    """sha256 over the encoded image bytes and every other field of every row."""
    raw = dataset.cast_column("image", Image(decode=False))
    h = hashlib.sha256()
    for row in raw:
        h.update(row["image"]["bytes"])
        h.update(repr([row[k] for k in FEATURES if k != "image"]).encode())
    return h.hexdigest()


def test_default_set_unchanged_byte_for_byte():
    # Digests computed with this very function on the commit before the grid variant existed (18d2aed).
    assert digest(make_shapes_dataset(24, image_size=64, seed=0)) == (
        "5cbddd1c76cc8156011b07ae126d941be9d690cdcc8c7d6b02f7c6ed4546124b")
    assert digest(make_shapes_dataset(8, image_size=112, seed=5, start_index=1000)) == (
        "bebf52cdcd14802e3f487606c9550ed31137eb267a98f30fd6a9e0480255886e")


def test_variant_deterministic_and_chunks_concatenate():
    full = make_shapes_dataset(10, image_size=112, seed=3, **VARIANT)
    assert digest(full) == digest(make_shapes_dataset(10, image_size=112, seed=3, **VARIANT))
    assert digest(make_shapes_dataset(4, image_size=112, seed=3, start_index=6, **VARIANT)) == digest(
        full.select(range(6, 10)))
    assert digest(make_shapes_dataset(10, image_size=112, seed=4, **VARIANT)) != digest(full)
    assert full[0]["image_id"] == "shapes-grid-3-0"  # never confused with the scatter set's rows


@pytest.mark.parametrize("image_size,num_objects", [(112, None), (64, 4)])
def test_every_image_holds_the_stated_objects(image_size, num_objects):
    data = make_shapes_dataset(40, image_size=image_size, seed=1, num_objects=num_objects, **VARIANT)
    count, cell = num_objects or len(SHAPES), image_size // GRID_CELLS
    for row in data.cast_column("image", Image(decode=False)):
        pixels = np.asarray(PIL.Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
        assert pixels.shape == (image_size, image_size, 3)
        assert len(row["boxes"]) == len(row["box_labels"]) == len(row["box_attributes"]) == count
        assert len(set(row["box_labels"])) == count  # distinct shapes
        cells = set()
        for (x, y, w, h), shape, (colour, size) in zip(row["boxes"], row["box_labels"], row["box_attributes"]):
            assert size == "small" and shape in SHAPES
            x, y, w, h = int(x), int(y), int(w), int(h)
            # The box is the tight box of exactly the pixels painted in the object's colour.
            ys, xs = np.nonzero((pixels == COLOURS[colour]).all(-1)[y:y + h, x:x + w])
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, w, h)
            # Inside one grid cell, 1 px clear of its border; one object per cell.
            cx, cy = x // cell, y // cell
            assert cx * cell + 1 <= x and x + w <= (cx + 1) * cell - 1
            assert cy * cell + 1 <= y and y + h <= (cy + 1) * cell - 1
            cells.add((cx, cy))
        assert len(cells) == count
        boxes = row["boxes"]
        for i in range(count):  # at least GAP apart on x or on y
            for j in range(i + 1, count):
                a, b = boxes[i], boxes[j]
                assert (a[0] + a[2] + GAP <= b[0] or b[0] + b[2] + GAP <= a[0]
                        or a[1] + a[3] + GAP <= b[1] or b[1] + b[3] + GAP <= a[1])


def test_question_names_one_object_and_the_answer_is_its_colour():
    data = make_shapes_dataset(200, image_size=112, seed=2, **VARIANT)
    asked, answers = [], []
    for row in data:
        assert len(row["questions"]) == len(row["answers"]) == 1
        shape = re.fullmatch(r"what color is the (\w+)\?", row["questions"][0]).group(1)
        assert row["box_labels"].count(shape) == 1
        colour = row["box_attributes"][row["box_labels"].index(shape)][0]
        assert row["answers"][0] == [colour] * 10
        asked.append(shape)
        answers.append(colour)
    # Every shape gets asked and every colour answers: no shortcut through a fixed target.
    assert set(asked) == set(SHAPES) and set(answers) == set(COLOURS)


def test_grid_with_all_questions_keeps_the_sets_question_kinds():
    for index in range(20):  # six objects: the count words reach "six"
        row = generate_shapes_row(index, seed=0, image_size=64, layout="grid")
        # colour (always: shapes are distinct), shape (when a colour is unique), count, existence, relation
        assert row["questions"][0].startswith("what color is the ") and 4 <= len(row["questions"]) <= 5
        for caption in row["captions"]:
            assert "objects" not in caption or caption.startswith(("six objects", "an image with six objects"))
        for question, answer in zip(row["questions"], row["answers"]):
            if question == "how many objects are there?":
                assert answer[0] == "6"


@pytest.mark.parametrize("kwargs,field", [
    (dict(layout="spiral"), "layout"),
    (dict(layout="grid", questions="everything"), "questions"),
    (dict(layout="grid", num_objects=7), "num_objects"),
    (dict(layout="grid", num_objects=0), "num_objects"),
    (dict(layout="grid", object_size="large"), "object_size"),
    (dict(layout="grid", object_size="medium"), "object_size"),
    (dict(num_objects=3), "num_objects"),
    (dict(questions="one_object_colour"), "questions"),
])
def test_bad_variant_options_fail_early_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_shapes_dataset(2, image_size=64, **kwargs)
