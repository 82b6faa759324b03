"""Load a COCO-format folder (captions, optional instances and VQAv2 files) into the leanvlp schema.

Layout (the COCO default; every file and folder can be given explicitly instead, absolute or
relative to ``root``)::

    root/annotations/captions_{split}.json          required
    root/annotations/instances_{split}.json         optional: boxes and category names
    root/annotations/v2_OpenEnded_mscoco_{split}_questions.json   optional VQAv2 questions
    root/annotations/v2_mscoco_{split}_annotations.json           optional VQAv2 answers
    root/{split}/<file_name of each image>

The optional files are used when given or when they exist at their default place. Rows follow
the order of ``images`` in the captions file. Two extensions of the instances format are read
when present: ``"attributes"`` (list of str) and ``"feature"`` (list of float) on an annotation
fill ``box_attributes`` and ``box_features``. Questions about images missing from the captions
file are ignored. Images are stored as paths and decoded lazily to RGB. Boxes follow the one box
rule (``leanvlp.processing.boxes.clip_box``): up to ``BOX_TOLERANCE`` pixels outside the image they
are clipped to it, further out they are an error naming the image id, the box and its value.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import PIL.Image
from datasets import Dataset

from .schema import FEATURES, check_utf8, clip_row_boxes, validate_row

__all__ = ["load_coco_folder"]


def _resolve(root: Path, value: str | Path | None, default: str, required: bool, what: str) -> Path | None:
    """The file `value` (or `root/default` when None); None for a missing optional default."""
    if value is None:
        path = root / default
        if not path.exists():
            if required:
                raise FileNotFoundError(f"{what}: file not found: {path}")
            return None
        return path
    path = Path(value)
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    return path


def _read_json(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except UnicodeDecodeError:
        check_utf8(path, "load_coco_folder", "annotations file")  # raises, naming the file and the line
        raise
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing or non-list key {key!r} (keys present: {sorted(data)})")
    return data


def _field(entry: dict, key: str, path: Path, what: str) -> Any:
    if key not in entry:
        raise ValueError(f"{path}: {what} without {key!r}: {json.dumps(entry)[:200]}")
    return entry[key]


def _instances(path: Path) -> dict[Any, list[dict]]:
    """Per image id: the box annotations with their category names; unknown category ids are errors."""
    data = _read_json(path, ("annotations", "categories"))
    names = {_field(c, "id", path, "category"): _field(c, "name", path, "category") for c in data["categories"]}
    per_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        category = _field(ann, "category_id", path, "annotation")
        if category not in names:
            per_image[_field(ann, "image_id", path, "annotation")].append(
                {"error": f"box_labels: unknown category id {category!r} in annotation id {ann.get('id')!r} "
                          f"of {path} (known ids: {sorted(names)[:20]})"})
            continue
        per_image[_field(ann, "image_id", path, "annotation")].append(
            {"box": _field(ann, "bbox", path, "annotation"), "label": names[category],
             "attributes": ann.get("attributes"), "feature": ann.get("feature")})
    return per_image


def _vqa(questions_path: Path, answers_path: Path | None) -> dict[Any, list[tuple[str, list[str]]]]:
    """Per image id: (question, answers) pairs joined on question_id."""
    questions = _read_json(questions_path, ("questions",))["questions"]
    answers: dict[Any, list[str]] = {}
    if answers_path is not None:
        for ann in _read_json(answers_path, ("annotations",))["annotations"]:
            qid = _field(ann, "question_id", answers_path, "annotation")
            answers[qid] = [_field(a, "answer", answers_path, "answer") if isinstance(a, dict) else a
                            for a in _field(ann, "answers", answers_path, "annotation")]
    per_image: dict[Any, list[tuple[str, list[str]]]] = defaultdict(list)
    for q in questions:
        qid = _field(q, "question_id", questions_path, "question")
        if answers_path is not None and qid not in answers:
            raise ValueError(f"answers: question id {qid!r} of {questions_path} has no annotation in {answers_path}")
        per_image[_field(q, "image_id", questions_path, "question")].append(
            (_field(q, "question", questions_path, "question"), answers.get(qid, [])))
    return per_image


def _check_image(path: Path, image_id: str, expected: tuple[Any, Any], verify: bool) -> tuple[int, int]:
    """Open the image (header, or fully when `verify`) and return its size; ValueError naming id and path."""
    if not path.is_file():
        raise ValueError(f"image: file for image id {image_id} not found or not a regular file: {path}")
    try:
        with PIL.Image.open(path) as image:
            if verify:
                image.load()
            size = image.size
    except (OSError, PIL.UnidentifiedImageError, SyntaxError) as err:
        raise ValueError(f"image: cannot read image id {image_id} at {path}: {err}") from err
    if all(v is not None for v in expected) and tuple(expected) != size:
        raise ValueError(f"image: image id {image_id} at {path} is {size[0]}x{size[1]} but the annotations "
                         f"say {expected[0]}x{expected[1]}")
    return size


def load_coco_folder(root: str | Path, split: str = "train2017", captions_file: str | Path | None = None,
                     instances_file: str | Path | None = None, questions_file: str | Path | None = None,
                     annotations_file: str | Path | None = None, image_dir: str | Path | None = None,
                     skip_bad: bool = False, verify_images: bool = False) -> Dataset:
    """Read a COCO-format folder into a ``datasets.Dataset`` in the leanvlp schema.

    ``skip_bad=True`` drops images that fail (unreadable file, bad box, unknown category, no
    caption ...) and warns with their ids; otherwise the first failure raises ValueError naming
    the image id and path. ``verify_images=True`` decodes every image fully (catches truncated
    files) instead of reading only the header.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: COCO folder not found: {root}")
    captions_path = _resolve(root, captions_file, f"annotations/captions_{split}.json", True, "captions_file")
    instances_path = _resolve(root, instances_file, f"annotations/instances_{split}.json", False, "instances_file")
    questions_path = _resolve(root, questions_file, f"annotations/v2_OpenEnded_mscoco_{split}_questions.json",
                              False, "questions_file")
    answers_path = _resolve(root, annotations_file, f"annotations/v2_mscoco_{split}_annotations.json",
                            False, "annotations_file")
    if answers_path is not None and questions_path is None:
        raise FileNotFoundError(f"questions_file: VQA annotations {answers_path} given but no questions file found")
    images_root = root / split if image_dir is None else (Path(image_dir) if Path(image_dir).is_absolute()
                                                          else root / image_dir)
    if not images_root.is_dir():
        raise FileNotFoundError(f"image_dir: image folder not found: {images_root}")

    data = _read_json(captions_path, ("images", "annotations"))
    captions: dict[Any, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        captions[_field(ann, "image_id", captions_path, "annotation")].append(
            _field(ann, "caption", captions_path, "annotation"))
    boxes = _instances(instances_path) if instances_path is not None else {}
    vqa = _vqa(questions_path, answers_path) if questions_path is not None else {}

    columns: dict[str, list] = {name: [] for name in FEATURES}
    bad: list[tuple[str, str]] = []
    for entry in data["images"]:
        raw_id = _field(entry, "id", captions_path, "image")
        image_id = str(raw_id)
        path = images_root / _field(entry, "file_name", captions_path, "image")
        try:
            row = _build_row(raw_id, image_id, path, entry, captions, boxes, vqa, verify_images)
        except ValueError as err:
            if not skip_bad:
                raise
            bad.append((image_id, str(err)))
            continue
        for name in FEATURES:
            columns[name].append(row[name])
    if bad:
        shown = ", ".join(image_id for image_id, _ in bad[:20]) + (" ..." if len(bad) > 20 else "")
        warnings.warn(f"load_coco_folder: skipped {len(bad)} bad images (ids {shown}); first error: {bad[0][1]}",
                      stacklevel=2)
    return Dataset.from_dict(columns, features=FEATURES)


def _build_row(raw_id: Any, image_id: str, path: Path, entry: dict, captions: dict, boxes: dict, vqa: dict,
               verify: bool) -> dict[str, Any]:
    """One schema row for image `raw_id`, validated against the real image size."""
    size = _check_image(path, image_id, (entry.get("width"), entry.get("height")), verify)
    anns = boxes.get(raw_id, [])
    for ann in anns:
        if "error" in ann:
            raise ValueError(ann["error"])
    with_attributes = any(a["attributes"] is not None for a in anns)
    with_features = any(a["feature"] is not None for a in anns)
    pairs = vqa.get(raw_id, [])
    row = {
        "image": str(path),
        "image_id": image_id,
        "captions": captions.get(raw_id, []),
        "boxes": [a["box"] for a in anns],
        "box_labels": [a["label"] for a in anns],
        "box_attributes": [a["attributes"] or [] for a in anns] if with_attributes else [],
        "box_features": [a["feature"] or [] for a in anns] if with_features else [],
        "questions": [q for q, _ in pairs],
        "answers": [a for _, a in pairs],
    }
    stand_in = {**row, "image": PIL.Image.new("1", size)}  # a blank stand-in of the real size
    try:
        row["boxes"] = stand_in["boxes"] = clip_row_boxes(stand_in, size[1], size[0], component="load_coco_folder")
        validate_row(stand_in, component="load_coco_folder")
    except (ValueError, TypeError) as err:
        raise ValueError(f"{err} [image file {path}]") from err
    return row
