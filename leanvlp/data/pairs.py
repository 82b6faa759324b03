"""From schema rows to what both recipes read: a split by kind, (image, text) pairs per task, one row per
image, decoded images.

`to_pairs` feeds training (one row per caption or question) and, through `eval_rows` / `task_rows`, evaluation
(one row per image or per question); images stay encoded until `decode_image`, so a corrupt one is reported
with its sample id.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import PIL.Image
from datasets import Dataset, IterableDataset
from datasets import Image as ImageFeature

from .coco import load_coco_folder
from .hf import load_hf_dataset
from .webdataset import WebDatasetStream

ANNOTATIONS = ("boxes", "box_labels", "box_attributes", "box_features")


def load_split(kind: str, data_path: str, split: str, image_column: str = "image", caption_column: str | None = None,
               streaming: bool = False, skip_bad: bool = False) -> Dataset | IterableDataset:
    """One split of a COCO folder (`kind="coco"`) or any `datasets` source (`kind="hf"`) in the row schema."""
    if kind == "coco":
        return load_coco_folder(data_path, split=split, skip_bad=skip_bad)
    return load_hf_dataset(data_path, split=split, streaming=streaming, image_column=image_column,
                           caption_column=caption_column)


def to_pairs(data: Dataset | IterableDataset, task: str, annotations: bool = False) -> Dataset | IterableDataset:
    """One row per (image, text) training pair: a caption, or a question with its most common answer.

    Images stay encoded (bytes) until the collator decodes them, so a corrupt image is reported with its id.
    `annotations=True` copies the image's boxes, box labels, attributes and teacher features onto each of its rows
    (PatchAlign's patch-level targets).
    """
    columns = set(data.column_names or [])
    needed = {"caption": ("image", "captions"), "vqa": ("image", "questions", "answers")}.get(task, ("image", "captions"))
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"dataset is missing column(s) {missing} needed for task {task!r}; it has {sorted(columns)}")
    if isinstance(data, Dataset) and len(data) == 0:
        raise ValueError("dataset is empty: no rows to train on")
    carried = [c for c in ANNOTATIONS if annotations and c in columns]
    if isinstance(data, WebDatasetStream):  # its rows carry undecoded images already
        return data.flat_map(partial(row_pairs, task=task, carried=carried))
    data = data.cast_column("image", ImageFeature(decode=False))

    def flatten(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "image_id": [], "question": [], "target": [], "references": [],
                                **{c: [] for c in carried}}
        for i in range(len(batch["image"])):
            row = {"image_id": str(i), **{k: values[i] for k, values in batch.items()}}
            for pair in row_pairs(row, task, carried):
                for k, v in pair.items():
                    out[k].append(v)
        return out

    pairs = data.map(flatten, batched=True, remove_columns=list(data.column_names))
    if isinstance(pairs, Dataset) and len(pairs) == 0:  # e.g. --task vqa on rows whose `questions` are all empty
        fields = "'questions' / 'answers' are" if task == "vqa" else "'captions' is"
        raise ValueError(f"to_pairs: {fields} empty in every one of the {len(data)} rows, so task {task!r} has "
                         "no pairs")
    return pairs


def row_pairs(row: dict[str, Any], task: str, carried: Sequence[str]) -> list[dict[str, Any]]:
    """`to_pairs` of one streamed row (module level, so DataLoader workers can pickle it)."""
    if task == "vqa":
        items = [(q, _majority(a), list(a)) for q, a in zip(row["questions"], row["answers"])]
    else:
        items = [("", c, list(row["captions"])) for c in row["captions"]]
    return [{"image": row["image"], "image_id": str(row["image_id"]), "question": q, "target": t, "references": r,
             **{c: row[c] for c in carried}} for q, t, r in items]


def _majority(answers: Sequence[str]) -> str:
    values, counts = np.unique(np.asarray(answers, dtype=object).astype(str), return_counts=True)
    return str(values[int(np.argmax(counts))])


def decode_image(image: Any, image_id: str) -> PIL.Image.Image:
    """An RGB PIL image from a `datasets.Image(decode=False)` value; a clear error names the sample."""
    try:
        if isinstance(image, PIL.Image.Image):
            return image.convert("RGB")
        if image.get("bytes") is not None:
            pil = PIL.Image.open(io.BytesIO(image["bytes"]))
        else:
            pil = PIL.Image.open(image["path"])
        pil.load()
        return pil.convert("RGB")
    except Exception as err:  # PIL raises several types for corrupt data
        where = image.get("path") if isinstance(image, dict) else None
        raise ValueError(f"corrupt or unreadable image in sample {image_id!r} ({where or 'embedded bytes'}): {err}") from err


def eval_rows(data: Dataset | None, task: str, limit: int) -> Dataset | None:
    """One row per image (its first caption / question) from an eval split, at most `limit`."""
    if data is None or len(data) == 0:
        return None
    pairs = to_pairs(data.select(range(min(limit, len(data)))), task)
    first = {}
    for i, image_id in enumerate(pairs["image_id"]):
        first.setdefault(image_id, i)
    return pairs.select(sorted(first.values()))


def task_rows(data: Dataset, task: str) -> Dataset:
    """Rows to generate for: one per image (caption) or one per question (vqa); names what is missing."""
    if task == "vqa":
        rows = to_pairs(data, "vqa")
        if len(rows) == 0:
            raise ValueError(f"task 'vqa' needs the fields 'questions' and 'answers', but none of the {len(data)} "
                             "images has a question")
        return rows
    rows = eval_rows(data, "caption", len(data))
    if rows is None or len(rows) == 0:
        raise ValueError(f"task {task!r} needs the field 'captions', but none of the {len(data)} images has a caption")
    return rows


def images_and_captions(data: Dataset) -> tuple[list[PIL.Image.Image], list[str], list[int]]:
    """Decoded images, every caption, and the image each caption belongs to (for retrieval)."""
    if "captions" not in (data.column_names or []):
        raise ValueError(f"retrieval needs the field 'captions'; the dataset has {sorted(data.column_names or [])}")
    data = data.cast_column("image", ImageFeature(decode=False))
    images, texts, owner = [], [], []
    for row in data:
        if not row["captions"]:
            continue  # an image without captions has no positive: leave it out of both directions
        images.append(decode_image(row["image"], row["image_id"]))
        texts += list(row["captions"])
        owner += [len(images) - 1] * len(row["captions"])
    if not images:
        raise ValueError(f"task 'retrieval' needs the field 'captions', but none of the {len(data)} images has one")
    return images, texts, owner
