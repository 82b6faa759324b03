"""The one row schema every leanvlp loader yields, and a validator that names what is wrong.

Fields (one row = one image):

- ``image`` (``datasets.Image(mode="RGB")``): the picture. Stored as PNG/JPEG bytes or a path;
  it decodes to an RGB ``PIL.Image``. Grayscale, RGBA and palette images are converted to RGB
  on decoding (not an error).
- ``image_id`` (str): a unique id of the sample, used in every error message and in evaluation.
- ``captions`` (list of str, at least one, none empty): reference captions of the image.
- ``boxes`` (list of ``[x, y, w, h]`` floats, optional = empty list): object boxes in COCO
  ``xywh`` form, in pixels of the *stored* image; ``w`` and ``h`` are > 0 and the box lies
  inside the image (up to ``BOX_TOLERANCE`` pixels of rounding).
- ``box_labels`` (list of str): the category name of each box; same length as ``boxes``.
- ``box_attributes`` (list of list of str, optional = empty list): attributes of each box
  (e.g. ``["red", "large"]``); when present, one list per box.
- ``box_features`` (list of list of float, optional = empty list): a teacher feature per box
  (e.g. a detector RoI feature) for the region-feature loss; when present, one vector per box,
  all of the same length.
- ``questions`` (list of str, optional = empty list): VQA questions about the image.
- ``answers`` (list of list of str): the answers of each question, VQAv2 style (up to 10 human
  answers per question; an empty list marks an unanswered question, e.g. a test split); same
  length as ``questions``. Synthetic sets repeat their single correct answer 10 times, so VQA
  soft accuracy is 1 for it and 0 for anything else.

Video rows (``VIDEO_FEATURES``) have ``frames`` (list of ``datasets.Image``), ``captions`` and
``image_id``.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping

import PIL.Image
from datasets import Features, Image, List, Value

__all__ = [
    "BOX_TOLERANCE",
    "FEATURES",
    "MAX_ANSWERS",
    "SCHEMA",
    "VIDEO_FEATURES",
    "image_size",
    "to_rgb",
    "validate_row",
]

MAX_ANSWERS = 10
BOX_TOLERANCE = 0.5  # pixels a box may stick out of the image (float rounding in annotations)

FEATURES = Features(
    {
        "image": Image(mode="RGB"),
        "image_id": Value("string"),
        "captions": List(Value("string")),
        "boxes": List(List(Value("float64"))),
        "box_labels": List(Value("string")),
        "box_attributes": List(List(Value("string"))),
        "box_features": List(List(Value("float32"))),
        "questions": List(Value("string")),
        "answers": List(List(Value("string"))),
    }
)
SCHEMA = FEATURES  # alias: "the schema" in docs and issues

VIDEO_FEATURES = Features(
    {
        "frames": List(Image(mode="RGB")),
        "image_id": Value("string"),
        "captions": List(Value("string")),
    }
)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode (L, LA, RGBA, P, I;16, CMYK ...) to RGB; RGB images pass through."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white instead of dropping alpha, so transparent pixels don't turn black.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of a PIL image or an undecoded ``{"bytes", "path"}`` dict, reading only the header."""
    if isinstance(image, PIL.Image.Image):
        return image.size
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            with PIL.Image.open(io.BytesIO(image["bytes"])) as im:
                return im.size
        if image.get("path"):
            with PIL.Image.open(image["path"]) as im:
                return im.size
    raise TypeError(f"image: expected a PIL.Image or a {{'bytes', 'path'}} dict, got {type(image).__name__}")


def _fail(field: str, where: str, why: str, value: Any) -> ValueError:
    text = repr(value)
    if len(text) > 200:
        text = text[:200] + "..."
    return ValueError(f"{field}: {why} (sample {where}; value {text})")


def _check_str_list(row: Mapping[str, Any], field: str, where: str, allow_empty_str: bool = False) -> list:
    value = row.get(field)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise _fail(field, where, "must be a list of str", value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(f"{field}[{i}]", where, f"must be str, got {type(item).__name__}", item)
        if not allow_empty_str and not item.strip():
            raise _fail(f"{field}[{i}]", where, "is empty", item)
    return list(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_row(row: Mapping[str, Any], index: int | None = None) -> None:
    """Check one row against the schema; raise ValueError/TypeError naming the field, sample and value.

    ``row["image"]`` may be a PIL image or an undecoded ``{"bytes", "path"}`` dict (only the
    header is read, to check that boxes lie inside the image). Optional fields may be missing,
    None or empty lists.
    """
    if not isinstance(row, Mapping):
        raise TypeError(f"row: expected a mapping, got {type(row).__name__}")
    image_id = row.get("image_id")
    where = repr(image_id) if image_id is not None else "?"
    if index is not None:
        where = f"{where} at index {index}"
    if not isinstance(image_id, str) or not image_id:
        raise _fail("image_id", where, "must be a non-empty str", image_id)
    unknown = sorted(set(row) - set(FEATURES))
    if unknown:
        raise _fail("row", where, f"unknown fields {unknown}; the schema has {list(FEATURES)}", unknown)

    if row.get("image") is None:
        raise _fail("image", where, "is missing", None)
    try:
        width, height = image_size(row["image"])
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise _fail("image", where, f"cannot be read ({err})", row["image"]) from err

    captions = row.get("captions")
    if not captions:
        raise _fail("captions", where, "missing: need at least one caption", captions)
    _check_str_list(row, "captions", where)

    boxes = row.get("boxes") or []
    if not isinstance(boxes, (list, tuple)):
        raise _fail("boxes", where, "must be a list of [x, y, w, h]", boxes)
    for i, box in enumerate(boxes):
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise _fail(f"boxes[{i}]", where, "must be 4 finite numbers [x, y, w, h]", box)
        x, y, w, h = box
        if w <= 0 or h <= 0:
            raise _fail(f"boxes[{i}]", where, "has zero or negative area", box)
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            raise _fail(f"boxes[{i}]", where, f"lies outside the {width}x{height} image", box)

    labels = _check_str_list(row, "box_labels", where)
    if len(labels) != len(boxes):
        raise _fail("box_labels", where, f"has {len(labels)} labels for {len(boxes)} boxes", labels)

    attributes = row.get("box_attributes") or []
    if attributes:
        if not isinstance(attributes, (list, tuple)) or len(attributes) != len(boxes):
            raise _fail("box_attributes", where, f"needs one list per box ({len(boxes)} boxes)", attributes)
        for i, attrs in enumerate(attributes):
            if not isinstance(attrs, (list, tuple)) or not all(isinstance(a, str) and a for a in attrs):
                raise _fail(f"box_attributes[{i}]", where, "must be a list of non-empty str", attrs)

    features = row.get("box_features") or []
    if features:
        if not isinstance(features, (list, tuple)) or len(features) != len(boxes):
            raise _fail("box_features", where, f"needs one vector per box ({len(boxes)} boxes)", features)
        dims = set()
        for i, vec in enumerate(features):
            if not isinstance(vec, (list, tuple)) or not vec or not all(_is_number(v) for v in vec):
                raise _fail(f"box_features[{i}]", where, "must be a non-empty list of finite floats", vec)
            dims.add(len(vec))
        if len(dims) > 1:
            raise _fail("box_features", where, f"vectors differ in length {sorted(dims)}", sorted(dims))

    questions = _check_str_list(row, "questions", where)
    answers = row.get("answers") or []
    if not isinstance(answers, (list, tuple)):
        raise _fail("answers", where, "must be a list of answer lists", answers)
    if len(answers) != len(questions):
        raise _fail("answers", where, f"has {len(answers)} answer lists for {len(questions)} questions", answers)
    for i, per_question in enumerate(answers):
        if not isinstance(per_question, (list, tuple)) or not all(isinstance(a, str) for a in per_question):
            raise _fail(f"answers[{i}]", where, "must be a list of str", per_question)
        if len(per_question) > MAX_ANSWERS:
            raise _fail(f"answers[{i}]", where, f"has {len(per_question)} answers; at most {MAX_ANSWERS}", per_question)
