"""Map any ``datasets`` dataset (local or hub, map-style or streaming) into the leanvlp schema.

``load_hf_dataset(source, image_column="image", caption_column="caption", boxes="bbox", ...)``:
keyword arguments named after schema fields give the source column of that field; a field whose
own name is a source column is taken as is, so a dataset already in the schema needs no mapping.
Conversions: a single caption / question string becomes a one-item list; VQAv2-style answer
dicts (``{"answer": ...}``) become their strings; ``ClassLabel`` box labels become their names;
a missing ``image_id`` becomes ``"{index}"``; boxes up to ``BOX_TOLERANCE`` pixels outside the image
are clipped to it (``leanvlp.processing.boxes.clip_box``, the processors' rule), boxes further out
are an error. Images are never re-encoded: the image column is read undecoded and decodes lazily to
RGB. Local JSON / JSONL / CSV files are checked to be UTF-8 first, so a bad byte names its file and
line (not a bare UnicodeDecodeError from the reader).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import PIL.Image
from datasets import (ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset, IterableDatasetDict,
                      List, Sequence, load_dataset, load_from_disk)

from .schema import FEATURES, check_utf8, clip_row_boxes, error_message, image_size, validate_row

__all__ = ["load_hf_dataset", "to_schema"]

_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
_TEXT_SUFFIXES = (".json", ".jsonl", ".csv")


def _pick_split(data: Any, split: str) -> Any:
    if isinstance(data, (DatasetDict, IterableDatasetDict)):
        if split not in data:
            raise ValueError(f"split: {split!r} not found; available splits: {list(data)}")
        return data[split]
    return data


def _open(source: Any, split: str, streaming: bool) -> Dataset | IterableDataset:
    """A Dataset or IterableDataset from an object, a save_to_disk folder, a data file/folder or a hub id."""
    if isinstance(source, (Dataset, IterableDataset, DatasetDict, IterableDatasetDict)):
        data = _pick_split(source, split)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            _check_saved_rows(path)
            data = _pick_split(load_from_disk(str(path)), split)
        elif path.is_file():
            if path.suffix not in _FILE_BUILDERS:
                raise ValueError(f"source: unsupported file type {path.suffix!r} ({path}); "
                                 f"supported: {sorted(_FILE_BUILDERS)}")
            if path.suffix in _TEXT_SUFFIXES:
                check_utf8(path, "load_hf_dataset", "source")
            data = load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train", streaming=streaming)
        else:  # a data folder (imagefolder, parquet files, metadata.jsonl ...) or a hub id
            if path.is_dir():
                for text_file in sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file()):
                    check_utf8(text_file, "load_hf_dataset", "source")
            data = load_dataset(str(source), split=split, streaming=streaming)
    else:
        raise TypeError(f"source: expected a path, a hub id or a datasets object, got {type(source).__name__}")
    if streaming and isinstance(data, Dataset):
        data = data.to_iterable_dataset()
    return data


def _check_saved_rows(path: Path) -> None:
    """An empty save_to_disk folder makes datasets fail with an IndexError from its internals: say what it is."""
    states = [path / "state.json"] if (path / "state.json").exists() else sorted(path.glob("*/state.json"))
    for state in states:
        if not json.loads(state.read_text()).get("_data_files"):
            raise ValueError(f"load_hf_dataset: source {state.parent} is an empty dataset (0 rows saved with "
                             "save_to_disk)")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    return list(value)


def _encode_image(value: Any, where: str) -> dict[str, Any]:
    """The undecoded ``{"bytes", "path"}`` form of an image cell (PIL images are PNG-encoded once)."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    if isinstance(value, str):
        return {"bytes": None, "path": value}
    if isinstance(value, bytes):
        return {"bytes": value, "path": None}
    if isinstance(value, PIL.Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    raise TypeError(f"image: sample {where}: expected an image, path or bytes, got {type(value).__name__}")


def _label_names(features: Features | None, column: str | None) -> list[str] | None:
    """Names of a ``List(ClassLabel)`` column, else None."""
    if features is None or column is None or column not in features:
        return None
    feature = features[column]
    inner = getattr(feature, "feature", None)
    return inner.names if isinstance(feature, (List, Sequence)) and isinstance(inner, ClassLabel) else None


def _convert(example: dict[str, Any], index: int, mapping: dict[str, str], names: list[str] | None,
             validate: bool) -> dict[str, Any]:
    """One source example -> one schema row."""
    def get(field: str) -> Any:
        column = mapping.get(field)
        if column is None:
            return None
        if column not in example:
            raise ValueError(f"{field}: column {column!r} not found; available columns: {sorted(example)}")
        return example[column]

    image_id = get("image_id")
    where = str(image_id) if image_id is not None else str(index)
    questions_value = get("questions")
    answers = _as_list(get("answers"))
    if isinstance(questions_value, str):  # one question per example: its answers are one list
        answers = [answers]
    labels = _as_list(get("box_labels"))
    if names is not None:
        labels = [names[i] if isinstance(i, int) else i for i in labels]
    row = {
        "image": _encode_image(get("image"), where),
        "image_id": where,
        "captions": _as_list(get("captions")),
        "boxes": [[float(v) for v in box] for box in _as_list(get("boxes"))],
        "box_labels": labels,
        "box_attributes": [_as_list(a) for a in _as_list(get("box_attributes"))],
        "box_features": [[float(v) for v in f] for f in _as_list(get("box_features"))],
        "questions": _as_list(questions_value),
        "answers": [[a["answer"] if isinstance(a, dict) else a for a in _as_list(per_q)] for per_q in answers],
    }
    if validate:
        validate_row(row, index, component="load_hf_dataset")
    if row["boxes"]:
        try:
            width, height = image_size(row["image"])
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise ValueError(error_message("load_hf_dataset", "image", f"cannot be read ({err})", where,
                                           row["image"])) from err
        row["boxes"] = clip_row_boxes(row, height, width, index, component="load_hf_dataset")
    return row


def to_schema(data: Dataset | IterableDataset, image_column: str = "image", caption_column: str | None = None,
              validate: bool = True, **column_mapping: str) -> Dataset | IterableDataset:
    """Map a loaded dataset into the schema (see the module docstring for the mapping rules)."""
    unknown = sorted(set(column_mapping) - set(FEATURES))
    if unknown:
        raise TypeError(f"column_mapping: unknown schema fields {unknown}; schema fields: {list(FEATURES)}")
    columns = data.column_names  # None for some streaming sources: then columns are checked per row
    mapping: dict[str, str] = {"image": image_column, **column_mapping}
    if caption_column is None:
        caption_column = next((c for c in ("captions", "caption") if columns is None or c in columns), None)
        if caption_column is None:
            raise ValueError(f"caption_column: no 'captions' or 'caption' column; available columns: {columns}")
    mapping["captions"] = caption_column
    for field in FEATURES:
        if field not in mapping and columns is not None and field in columns:
            mapping[field] = field
    if columns is not None:
        for field, column in mapping.items():
            if column not in columns:
                raise ValueError(f"{field}: column {column!r} not found; available columns: {columns}")
    features = data.features
    if features is not None and image_column in features:
        data = data.cast_column(image_column, Image(decode=False))
    names = _label_names(features, mapping.get("box_labels"))
    # The image cell passes through as undecoded {"bytes", "path"}; FEATURES decodes it (to RGB) on read.
    fn_kwargs = {"mapping": mapping, "names": names, "validate": validate}
    if isinstance(data, Dataset):
        return data.map(_convert, with_indices=True, remove_columns=columns, features=FEATURES, fn_kwargs=fn_kwargs,
                        desc="to leanvlp schema")
    # Streaming: map untyped, then cast. (datasets 5.2 does not decode images of a map(features=...) stream.)
    data = data.map(_convert, with_indices=True, remove_columns=columns, fn_kwargs=fn_kwargs)
    if columns is None:
        data = data.select_columns(list(FEATURES))
    return data.cast(FEATURES)


def load_hf_dataset(source: Any, split: str = "train", image_column: str = "image", caption_column: str | None = None,
                    streaming: bool = False, validate: bool = True, **column_mapping: str) -> Dataset | IterableDataset:
    """Load `source` (datasets object, save_to_disk folder, data file/folder or hub id) into the schema.

    ``streaming=True`` returns an ``IterableDataset`` that maps rows lazily (for large sets).
    """
    return to_schema(_open(source, split, streaming), image_column=image_column, caption_column=caption_column,
                     validate=validate, **column_mapping)
