"""The `datasets` loader: column mapping into the schema, local paths and files, streaming, clear errors."""

import io
import json

import numpy as np
import PIL.Image
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset, List, Value, load_dataset

from leanvlp.data import FEATURES, load_hf_dataset, make_shapes_dataset


def png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shapes():
    return make_shapes_dataset(10, seed=9)


@pytest.fixture(scope="module")
def foreign():
    """A dataset with its own column names: one caption string, ClassLabel labels, VQAv2 answer dicts."""
    features = Features({
        "img": Image(),
        "text": Value("string"),
        "uid": Value("int64"),
        "bbox": List(List(Value("float32"))),
        "cats": List(ClassLabel(names=["cat", "dog"])),
        "question": Value("string"),
        "answers": List({"answer": Value("string"), "answer_confidence": Value("string")}),
        "extra": Value("string"),
    })
    return Dataset.from_dict({
        "img": [{"bytes": png(PIL.Image.new("L", (20, 10), 100)), "path": None},
                {"bytes": png(PIL.Image.new("RGBA", (8, 8), (10, 20, 30, 255))), "path": None}],
        "text": ["a gray picture", "a dark picture"],
        "uid": [41, 42],
        "bbox": [[[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 10.0, 8.0]], []],
        "cats": [[1, 0], []],
        "question": ["is it gray?", "is it dark?"],
        "answers": [[{"answer": "yes", "answer_confidence": "yes"}] * 3,
                    [{"answer": "no", "answer_confidence": "maybe"}]],
        "extra": ["x", "y"],
    }, features=features)


def test_schema_dataset_maps_to_itself(shapes):
    mapped = load_hf_dataset(shapes)
    assert mapped.features == FEATURES
    for field in FEATURES:
        if field != "image":
            assert mapped[field] == shapes[field], field
    assert np.array_equal(np.asarray(mapped[3]["image"]), np.asarray(shapes[3]["image"]))


def test_column_mapping_and_conversions(foreign):
    mapped = load_hf_dataset(foreign, image_column="img", caption_column="text", image_id="uid", boxes="bbox",
                             box_labels="cats", questions="question", answers="answers")
    assert mapped.features == FEATURES and mapped.column_names == list(FEATURES)
    assert mapped["image_id"] == ["41", "42"]
    assert mapped["captions"] == [["a gray picture"], ["a dark picture"]]
    assert mapped["boxes"] == [[[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 10.0, 8.0]], []]
    assert mapped["box_labels"] == [["dog", "cat"], []]
    assert mapped["questions"] == [["is it gray?"], ["is it dark?"]]
    assert mapped["answers"] == [[["yes"] * 3], [["no"]]]
    first, second = mapped[0]["image"], mapped[1]["image"]
    assert (first.mode, first.size, first.getpixel((0, 0))) == ("RGB", (20, 10), (100, 100, 100))
    assert (second.mode, second.getpixel((0, 0))) == ("RGB", (10, 20, 30))


def test_caption_column_is_found_and_ids_default_to_the_index():
    data = Dataset.from_dict({"image": [{"bytes": png(PIL.Image.new("RGB", (4, 4))), "path": None}] * 2,
                              "caption": ["one", "two"]},
                             features=Features({"image": Image(), "caption": Value("string")}))
    mapped = load_hf_dataset(data)
    assert mapped["captions"] == [["one"], ["two"]] and mapped["image_id"] == ["0", "1"]


def test_missing_column_names_it_and_lists_the_columns(foreign):
    with pytest.raises(ValueError, match=r"image: column 'image' not found; available columns: \['img', 'text'"):
        load_hf_dataset(foreign, caption_column="text")
    with pytest.raises(ValueError, match=r"caption_column: no 'captions' or 'caption' column; available columns"):
        load_hf_dataset(foreign, image_column="img")
    with pytest.raises(ValueError, match=r"boxes: column 'boxes_xywh' not found"):
        load_hf_dataset(foreign, image_column="img", caption_column="text", boxes="boxes_xywh")
    with pytest.raises(TypeError, match=r"unknown schema fields \['bboxes'\]"):
        load_hf_dataset(foreign, image_column="img", caption_column="text", bboxes="bbox")


def test_bad_rows_fail_validation_naming_the_field(foreign):
    bad = foreign.map(lambda row: {"bbox": [[1.0, 2.0, 30.0, 4.0]] if row["uid"] == 42 else row["bbox"],
                                   "cats": [0] if row["uid"] == 42 else row["cats"]})
    with pytest.raises(ValueError, match=r"^load_hf_dataset: boxes\[0\] lies outside the 8x8 image by 23 px "
                                         r"\(tolerance 0.5 px\) \(sample '42' at index 1, value \[1.0, 2.0, 30.0, 4.0\]\)$"):
        load_hf_dataset(bad, image_column="img", caption_column="text", image_id="uid", boxes="bbox",
                        box_labels="cats", questions="question")
    empty = foreign.map(lambda row: {"text": ""})
    with pytest.raises(ValueError, match=r"^load_hf_dataset: captions\[0\] is empty"):
        load_hf_dataset(empty, image_column="img", caption_column="text", questions="question")
    # "answers" is taken by its own name; without questions mapped the counts disagree, and that is named.
    with pytest.raises(ValueError, match=r"answers has 3 answer lists for 0 questions \(sample '0' at index 0"):
        load_hf_dataset(foreign, image_column="img", caption_column="text")


def test_local_save_to_disk_folder_and_splits(tmp_path, shapes):
    DatasetDict({"train": shapes, "test": shapes.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    shapes.save_to_disk(str(tmp_path / "single"))
    assert load_hf_dataset(str(tmp_path / "dd"), split="test")["captions"] == shapes["captions"][:3]
    assert load_hf_dataset(tmp_path / "single")["boxes"] == shapes["boxes"]
    with pytest.raises(ValueError, match=r"split: 'validation' not found; available splits: \['train', 'test'\]"):
        load_hf_dataset(str(tmp_path / "dd"), split="validation")


def test_streaming_gives_the_same_rows(tmp_path, shapes):
    expected = load_hf_dataset(shapes)
    shapes.save_to_disk(str(tmp_path / "single"))
    for source in (shapes, str(tmp_path / "single")):
        streamed = load_hf_dataset(source, streaming=True)
        assert isinstance(streamed, IterableDataset)
        rows = list(streamed)
        assert [r["captions"] for r in rows] == expected["captions"]
        assert [r["answers"] for r in rows] == expected["answers"]
        assert rows[2]["image"].mode == "RGB"
        assert np.array_equal(np.asarray(rows[2]["image"]), np.asarray(expected[2]["image"]))


def test_streaming_a_local_jsonl_file_with_image_paths(tmp_path):
    lines = []
    for i, mode in enumerate(["RGB", "L", "P"]):
        path = tmp_path / f"im{i}.png"
        PIL.Image.new(mode, (6, 4), 50).save(path)
        lines.append(json.dumps({"file": str(path), "caption": f"picture {i}", "key": f"k{i}"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    for streaming in (False, True):
        mapped = load_hf_dataset(tmp_path / "data.jsonl", image_column="file", image_id="key", streaming=streaming)
        rows = list(mapped)
        assert [r["image_id"] for r in rows] == ["k0", "k1", "k2"]
        assert [r["captions"] for r in rows] == [["picture 0"], ["picture 1"], ["picture 2"]]
        assert all(r["image"].mode == "RGB" and r["image"].size == (6, 4) for r in rows)
        assert set(rows[0]) == set(FEATURES)


def test_stream_without_known_columns_is_checked_row_by_row(tmp_path):
    path = tmp_path / "im.png"
    PIL.Image.new("LA", (5, 3)).save(path)
    (tmp_path / "data.jsonl").write_text(json.dumps({"file": str(path), "caption": "a picture", "junk": 1}))
    raw = load_dataset("json", data_files=str(tmp_path / "data.jsonl"), split="train", streaming=True)
    raw = raw.map(lambda row: {"caption": row["caption"].upper()})  # features unknown after this map
    assert raw.column_names is None
    (row,) = list(load_hf_dataset(raw, image_column="file", caption_column="caption"))
    assert row["captions"] == ["A PICTURE"] and row["image"].mode == "RGB" and set(row) == set(FEATURES)
    with pytest.raises(ValueError, match=r"image: column 'picture' not found; available columns: \['caption'"):
        list(load_hf_dataset(raw, image_column="picture", caption_column="caption"))


@pytest.mark.parametrize("as_dict", [False, True])
def test_an_empty_saved_dataset_is_refused_naming_the_folder(tmp_path, as_dict):
    empty = make_shapes_dataset(2, image_size=32).select([])
    (DatasetDict(train=empty) if as_dict else empty).save_to_disk(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"load_hf_dataset: source .*empty.* is an empty dataset \(0 rows"):
        load_hf_dataset(tmp_path / "empty")


def test_box_within_the_tolerance_is_clipped_like_the_processor(foreign):
    """The worked numbers of tests/test_boxes.py, on the 20x10 image: 0.25 px out left, 0.375 px out at the bottom."""
    near = foreign.map(lambda row: {"bbox": [[-0.25, 2.0, 5.0, 8.375]] if row["uid"] == 41 else row["bbox"],
                                    "cats": [0] if row["uid"] == 41 else row["cats"]})
    for streaming in (False, True):
        source = near.to_iterable_dataset() if streaming else near
        mapped = load_hf_dataset(source, image_column="img", caption_column="text", image_id="uid", boxes="bbox",
                                 box_labels="cats", questions="question")
        assert [row["boxes"] for row in mapped] == [[[0.0, 2.0, 4.75, 8.0]], []]


@pytest.mark.parametrize("streaming", [False, True])
def test_non_utf8_jsonl_names_the_file_and_the_line(tmp_path, streaming):
    path = tmp_path / "im.png"
    PIL.Image.new("RGB", (4, 4)).save(path)
    good = json.dumps({"file": str(path), "caption": "fine"}).encode()
    bad = json.dumps({"file": str(path), "caption": "caf_"}).encode().replace(b"caf_", b"caf\xe9")  # Latin-1 e-acute
    (tmp_path / "data.jsonl").write_bytes(b"\n".join([good, good, bad, good]))
    with pytest.raises(ValueError) as err:
        list(load_hf_dataset(tmp_path / "data.jsonl", image_column="file", streaming=streaming))
    offset = 2 * (len(good) + 1) + bad.index(b"\xe9")
    assert str(err.value) == (f"load_hf_dataset: source {str(tmp_path / 'data.jsonl')!r} is not valid UTF-8: byte 0xe9 "
                              f"at line 3 (byte offset {offset}); re-save it as UTF-8")
    (tmp_path / "data.jsonl").unlink()
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "metadata.jsonl").write_bytes(bad)  # a data folder: its text files are checked too
    with pytest.raises(ValueError, match=r"source '.*metadata.jsonl' is not valid UTF-8: byte 0xe9 at line 1 "):
        load_hf_dataset(tmp_path / "folder", image_column="file", streaming=streaming)


def test_lone_surrogate_names_the_field_the_sample_and_the_value():
    """Arrow cannot hold one, but a Python-side stream can: the validator names it before the tokenizer sees it."""
    image = {"bytes": png(PIL.Image.new("RGB", (4, 4))), "path": None}

    def rows():
        yield {"image": image, "caption": "a blue square", "uid": "s0"}
        yield {"image": image, "caption": "a red \ud800 circle", "uid": "s1"}

    stream = IterableDataset.from_generator(rows)
    with pytest.raises(ValueError) as err:
        list(load_hf_dataset(stream, caption_column="caption", image_id="uid"))
    assert str(err.value) == ("load_hf_dataset: captions[0] contains a lone surrogate '\\ud800' at character 6 "
                              "(sample 's1' at index 1, value 'a red \\ud800 circle')")
