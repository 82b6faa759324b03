"""The one row schema every leanvlp loader yields, and a validator that names what is wrong.

Fields (one row = one image):

- ``image`` (``datasets.Image(mode="RGB")``): the picture. Stored as PNG/JPEG bytes or a path;
  it decodes to an RGB ``PIL.Image``. Grayscale, RGBA and palette images are converted to RGB
  on decoding (not an error).
- ``image_id`` (str): a unique id of the sample, used in every error message and in evaluation.
- ``captions`` (list of str, at least one, none empty): reference captions of the image.
- ``boxes`` (list of ``[x, y, w, h]`` floats, optional = empty list): object boxes in COCO
  ``xywh`` form, in pixels of the *stored* image; ``w`` and ``h`` are > 0 and the box lies
  inside the image. The one box rule (``leanvlp.processing.boxes.clip_box``, shared with the
  processors): a box sticking out by at most ``BOX_TOLERANCE`` pixels (rounding) is clipped by
  the loaders (and by the processors, identically); a box further out is an error.
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

Text fields must be encodable as UTF-8 (no lone surrogates such as ``"\\ud800"``), which both Arrow
and the tokenizers need. Errors share one style (``error_message``):
``<Component>: <field> <what is wrong> (sample <id>, value <v>)``.
"""

from __future__ import annotations

import codecs
import io
import math
from pathlib import Path
from typing import Any, Mapping

import PIL.Image
from datasets import Features, Image, List, Value

from ..processing.boxes import BOX_TOLERANCE, clip_box
from ..processing.inputs import to_rgb  # one conversion for loaders and processors (the processors ship alone)

__all__ = [
    "BOX_TOLERANCE",
    "FEATURES",
    "MAX_ANSWERS",
    "SCHEMA",
    "VIDEO_FEATURES",
    "check_utf8",
    "clip_row_boxes",
    "error_message",
    "image_size",
    "to_rgb",
    "validate_row",
]

MAX_ANSWERS = 10
_NO_VALUE = object()

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


def error_message(component: str, field: str, what: str, sample: str | None = None, value: Any = _NO_VALUE) -> str:
    """The shared error style ``<Component>: <field> <what is wrong> (sample <id>, value <v>)``; values as repr, cut."""
    details = [] if sample is None else [f"sample {sample}"]
    if value is not _NO_VALUE:
        text = repr(value)
        details.append(f"value {text[:200] + '...' if len(text) > 200 else text}")
    return f"{component}: {field} {what}" + (f" ({', '.join(details)})" if details else "")


def check_utf8(path: str | Path, component: str, field: str) -> None:
    """Raise ValueError naming the file, line and byte when `path` is not valid UTF-8 (read in 1 MiB chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                # err.start counts from the decoder's buffered tail (< 4 bytes of the last chunk, no newline)
                start = err.start - (len(err.object) - len(chunk))  # in this chunk; negative: in the tail
                line += chunk.count(b"\n", 0, max(start, 0))
                raise ValueError(error_message(
                    component, field, f"{str(path)!r} is not valid UTF-8: byte 0x{err.object[err.start]:02x} at line "
                    f"{line} (byte offset {offset + start}); re-save it as UTF-8")) from None
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(error_message(component, field, f"{str(path)!r} is not valid UTF-8: it ends inside a "
                                           f"multi-byte character (line {line}); re-save it as UTF-8")) from None


class _Fail:
    """Builds validate_row's errors for one sample: ``fail(field, why, value)`` -> ValueError in the shared style."""

    def __init__(self, component: str, where: str):
        self.component, self.where = component, where

    def __call__(self, field: str, why: str, value: Any) -> ValueError:
        return ValueError(error_message(self.component, field, why, self.where, value))


def _check_text(fail: _Fail, field: str, value: str) -> None:
    """A lone surrogate (e.g. from a JSON "\\ud800" escape) breaks Arrow and the tokenizers: name it here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise fail(field, f"contains a lone surrogate {value[err.start]!r} at character {err.start}", value) from None


def _check_str_list(fail: _Fail, field: str, value: Any, allow_empty_str: bool = False) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise fail(field, "must be a list of str", value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise fail(f"{field}[{i}]", f"must be str, got {type(item).__name__}", item)
        if not allow_empty_str and not item.strip():
            raise fail(f"{field}[{i}]", "is empty", item)
        _check_text(fail, f"{field}[{i}]", item)
    return list(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sample(row: Mapping[str, Any], index: int | None) -> str:
    image_id = row.get("image_id")
    where = repr(image_id) if image_id is not None else "?"
    return where if index is None else f"{where} at index {index}"


def clip_row_boxes(row: Mapping[str, Any], height: int, width: int, index: int | None = None,
                   component: str = "validate_row") -> list[list[float]]:
    """``row["boxes"]`` under the one box rule (``clip_box``): clipped within tolerance, else a ValueError naming them."""
    fail = _Fail(component, _sample(row, index))
    boxes = row.get("boxes") or []
    if not isinstance(boxes, (list, tuple)):
        raise fail("boxes", "must be a list of [x, y, w, h]", boxes)
    clipped = []
    for i, box in enumerate(boxes):
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise fail(f"boxes[{i}]", "must be 4 finite numbers [x, y, w, h]", box)
        try:
            clipped.append(clip_box(box, height, width))
        except ValueError as err:
            raise fail(f"boxes[{i}]", str(err), box) from None
    return clipped


def validate_row(row: Mapping[str, Any], index: int | None = None, component: str = "validate_row") -> None:
    """Check one row against the schema; raise ValueError/TypeError naming the field, sample and value.

    ``row["image"]`` may be a PIL image or an undecoded ``{"bytes", "path"}`` dict (only the
    header is read, to check that boxes lie inside the image; boxes within ``BOX_TOLERANCE``
    pass, as the loaders and processors clip them). Optional fields may be missing, None or empty
    lists. ``component`` starts each message (the loader that calls this).
    """
    if not isinstance(row, Mapping):
        raise TypeError(error_message(component, "row", f"must be a mapping, got {type(row).__name__}"))
    where = _sample(row, index)
    fail = _Fail(component, where)
    image_id = row.get("image_id")
    if not isinstance(image_id, str) or not image_id:
        raise fail("image_id", "must be a non-empty str", image_id)
    _check_text(fail, "image_id", image_id)
    unknown = sorted(set(row) - set(FEATURES))
    if unknown:
        raise fail("row", f"has unknown fields {unknown}; the schema has {list(FEATURES)}", unknown)

    if row.get("image") is None:
        raise fail("image", "is missing", None)
    try:
        width, height = image_size(row["image"])
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise fail("image", f"cannot be read ({err})", row["image"]) from err

    captions = row.get("captions")
    if not captions:
        raise fail("captions", "is missing: need at least one caption", captions)
    _check_str_list(fail, "captions", captions)

    boxes = clip_row_boxes(row, height, width, index, component)

    labels = _check_str_list(fail, "box_labels", row.get("box_labels"))
    if len(labels) != len(boxes):
        raise fail("box_labels", f"has {len(labels)} labels for {len(boxes)} boxes", labels)

    attributes = row.get("box_attributes") or []
    if attributes:
        if not isinstance(attributes, (list, tuple)) or len(attributes) != len(boxes):
            raise fail("box_attributes", f"needs one list per box ({len(boxes)} boxes)", attributes)
        for i, attrs in enumerate(attributes):
            if not isinstance(attrs, (list, tuple)) or not all(isinstance(a, str) and a for a in attrs):
                raise fail(f"box_attributes[{i}]", "must be a list of non-empty str", attrs)
            _check_str_list(fail, f"box_attributes[{i}]", attrs)

    features = row.get("box_features") or []
    if features:
        if not isinstance(features, (list, tuple)) or len(features) != len(boxes):
            raise fail("box_features", f"needs one vector per box ({len(boxes)} boxes)", features)
        dims = set()
        for i, vec in enumerate(features):
            if not isinstance(vec, (list, tuple)) or not vec or not all(_is_number(v) for v in vec):
                raise fail(f"box_features[{i}]", "must be a non-empty list of finite floats", vec)
            dims.add(len(vec))
        if len(dims) > 1:
            raise fail("box_features", f"vectors differ in length {sorted(dims)}", sorted(dims))

    questions = _check_str_list(fail, "questions", row.get("questions"))
    answers = row.get("answers") or []
    if not isinstance(answers, (list, tuple)):
        raise fail("answers", "must be a list of answer lists", answers)
    if len(answers) != len(questions):
        raise fail("answers", f"has {len(answers)} answer lists for {len(questions)} questions", answers)
    for i, per_question in enumerate(answers):
        if not isinstance(per_question, (list, tuple)) or not all(isinstance(a, str) for a in per_question):
            raise fail(f"answers[{i}]", "must be a list of str", per_question)
        if len(per_question) > MAX_ANSWERS:
            raise fail(f"answers[{i}]", f"has {len(per_question)} answers; at most {MAX_ANSWERS}", per_question)
        _check_str_list(fail, f"answers[{i}]", per_question, allow_empty_str=True)
