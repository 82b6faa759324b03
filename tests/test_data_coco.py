"""The COCO-folder loader: a mini COCO folder written from the shapes set reads back exactly; each error case."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from leanvlp.data import load_coco_folder, make_shapes_dataset

SPLIT = "val2017"


def write_mini_coco(root: Path, dataset, with_attributes: bool = True) -> dict:
    """Write `dataset` as a COCO folder: PNG files, captions, instances (+attributes) and VQAv2 jsons."""
    (root / SPLIT).mkdir(parents=True)
    (root / "annotations").mkdir()
    names = sorted({label for row in dataset for label in row["box_labels"]})
    category_ids = {name: 10 + 3 * i for i, name in enumerate(names)}  # non-contiguous ids, like COCO
    images, captions, instances, questions, answers = [], [], [], [], []
    for n, row in enumerate(dataset):
        image_id = 1000 + 7 * n
        file_name = f"{image_id:012d}.png"
        row["image"].save(root / SPLIT / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": row["image"].width,
                       "height": row["image"].height})
        for caption in row["captions"]:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption})
        for box, label, attrs in zip(row["boxes"], row["box_labels"], row["box_attributes"]):
            ann = {"id": len(instances) + 1, "image_id": image_id, "bbox": box, "category_id": category_ids[label],
                   "iscrowd": 0, "area": box[2] * box[3]}
            if with_attributes:
                ann["attributes"] = attrs
            instances.append(ann)
        for question, answer_list in zip(row["questions"], row["answers"]):
            qid = len(questions) + 1
            questions.append({"question_id": qid, "image_id": image_id, "question": question})
            answers.append({"question_id": qid, "image_id": image_id, "multiple_choice_answer": answer_list[0],
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(answer_list)]})
    files = {
        f"captions_{SPLIT}.json": {"images": images, "annotations": captions},
        f"instances_{SPLIT}.json": {"images": images, "annotations": instances,
                                    "categories": [{"id": i, "name": n, "supercategory": "shape"}
                                                   for n, i in category_ids.items()]},
        f"v2_OpenEnded_mscoco_{SPLIT}_questions.json": {"questions": questions},
        f"v2_mscoco_{SPLIT}_annotations.json": {"annotations": answers},
    }
    for name, content in files.items():
        (root / "annotations" / name).write_text(json.dumps(content))
    return {"ids": [str(im["id"]) for im in images], "files": {n: root / "annotations" / n for n in files}}


@pytest.fixture(scope="module")
def source():
    return make_shapes_dataset(12, seed=5)


@pytest.fixture
def coco(tmp_path, source):
    return tmp_path, write_mini_coco(tmp_path, source)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_mini_coco_reads_back_exactly(coco, source):
    root, info = coco
    loaded = load_coco_folder(root, split=SPLIT)
    assert len(loaded) == len(source)
    assert loaded["image_id"] == info["ids"]
    for fields in ("captions", "boxes", "box_labels", "box_attributes", "questions", "answers", "box_features"):
        assert loaded[fields] == source[fields], fields
    for a, b in zip(loaded, source):
        assert a["image"].mode == "RGB"
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_optional_files_are_optional_and_explicit_paths_work(tmp_path, source):
    info = write_mini_coco(tmp_path, source, with_attributes=False)
    for name in (f"instances_{SPLIT}.json", f"v2_OpenEnded_mscoco_{SPLIT}_questions.json",
                 f"v2_mscoco_{SPLIT}_annotations.json"):
        info["files"][name].rename(tmp_path / name)  # away from the default place
    plain = load_coco_folder(tmp_path, split=SPLIT)
    assert plain["captions"] == source["captions"]
    assert all(b == [] for b in plain["boxes"]) and all(q == [] for q in plain["questions"])
    full = load_coco_folder(tmp_path, split=SPLIT, instances_file=f"instances_{SPLIT}.json",
                            questions_file=tmp_path / f"v2_OpenEnded_mscoco_{SPLIT}_questions.json",
                            annotations_file=f"v2_mscoco_{SPLIT}_annotations.json")
    assert full["boxes"] == source["boxes"] and full["answers"] == source["answers"]
    assert all(a == [] for a in full["box_attributes"])  # no attributes in the file


def test_missing_files_name_the_path(coco):
    root, info = coco
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        load_coco_folder(root, split="train2017")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_coco_folder(root, split=SPLIT, instances_file="nowhere.json")
    with pytest.raises(FileNotFoundError, match="image_dir.*pics"):
        load_coco_folder(root, split=SPLIT, image_dir="pics")
    with pytest.raises(FileNotFoundError, match="root"):
        load_coco_folder(root / "absent", split=SPLIT)


def test_malformed_json_names_the_file_and_the_error(coco):
    root, info = coco
    path = info["files"][f"instances_{SPLIT}.json"]
    path.write_text('{"images": [1, 2,]}')
    with pytest.raises(ValueError, match=rf"instances_{SPLIT}\.json: malformed JSON: .*line 1 column"):
        load_coco_folder(root, split=SPLIT)


def test_missing_key_names_the_file_and_the_key(coco):
    root, info = coco
    edit_json(info["files"][f"captions_{SPLIT}.json"], lambda d: d.pop("images"))
    with pytest.raises(ValueError, match=rf"captions_{SPLIT}\.json: missing or non-list key 'images'"):
        load_coco_folder(root, split=SPLIT)


@pytest.mark.parametrize("bbox,why", [([50.0, 10.0, 14.625, 5.0], "lies outside the 64x64 image by 0.625 px "
                                                                  "(tolerance 0.5 px)"),
                                      ([-4.0, 10.0, 8.0, 8.0], "lies outside the 64x64 image by 4 px (tolerance 0.5 px)"),
                                      ([10.0, 10.0, 0.0, 8.0], "has zero or negative area")])
def test_bad_box_names_the_box_and_the_image(coco, bbox, why):
    root, info = coco
    edit_json(info["files"][f"instances_{SPLIT}.json"], lambda d: d["annotations"][0].update(bbox=bbox))
    with pytest.raises(ValueError) as err:
        load_coco_folder(root, split=SPLIT)
    image_id = info["ids"][0]
    assert str(err.value) == (f"load_coco_folder: boxes[0] {why} (sample '{image_id}', value {bbox}) "
                              f"[image file {root / SPLIT / f'{int(image_id):012d}.png'}]")


def test_box_within_the_tolerance_is_clipped(coco, source):
    """The worked numbers of tests/test_boxes.py: 0.25 px out left, 0.375 px out at the bottom of 64x64."""
    root, info = coco
    edit_json(info["files"][f"instances_{SPLIT}.json"],
              lambda d: d["annotations"][0].update(bbox=[-0.25, 10.0, 20.0, 54.375]))
    loaded = load_coco_folder(root, split=SPLIT)
    assert loaded[0]["boxes"][0] == [0.0, 10.0, 19.75, 54.0]
    assert loaded["boxes"][1:] == source["boxes"][1:]  # boxes inside the image stay exactly as they were


def test_non_utf8_annotations_file_names_the_file_and_the_line(coco):
    root, info = coco
    path = info["files"][f"captions_{SPLIT}.json"]
    text = json.dumps(json.loads(path.read_text()), indent=1).encode()
    line = text[: text.index(b'"caption"')].count(b"\n") + 1
    path.write_bytes(text.replace(b'"caption": "', b'"caption": "\xff', 1))
    with pytest.raises(ValueError) as err:
        load_coco_folder(root, split=SPLIT)
    assert str(err.value).startswith(f"load_coco_folder: annotations file {str(path)!r} is not valid UTF-8: byte 0xff "
                                     f"at line {line} (byte offset ")


def test_lone_surrogate_in_a_caption_names_the_field_and_the_image(coco):
    root, info = coco
    path = info["files"][f"captions_{SPLIT}.json"]
    path.write_text(path.read_text().replace('"caption": "', '"caption": "\\ud800', 1))  # a JSON escape, valid UTF-8
    with pytest.raises(ValueError, match=rf"^load_coco_folder: captions\[0\] contains a lone surrogate '\\ud800' "
                                         rf"at character 0 \(sample '{info['ids'][0]}', value '\\ud800"):
        load_coco_folder(root, split=SPLIT)


def test_unknown_category_names_the_id_and_the_annotation(coco):
    root, info = coco
    edit_json(info["files"][f"instances_{SPLIT}.json"], lambda d: d["annotations"][2].update(category_id=999))
    with pytest.raises(ValueError, match="unknown category id 999 in annotation id 3"):
        load_coco_folder(root, split=SPLIT)


def test_unreadable_image_is_reported_with_its_id_or_skipped(coco, source):
    root, info = coco
    bad_id = info["ids"][3]
    (root / SPLIT / f"{int(bad_id):012d}.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=rf"cannot read image id {bad_id} at .*{int(bad_id):012d}\.png"):
        load_coco_folder(root, split=SPLIT)
    with pytest.warns(UserWarning, match=rf"skipped 1 bad images \(ids {bad_id}\)"):
        loaded = load_coco_folder(root, split=SPLIT, skip_bad=True)
    assert len(loaded) == len(source) - 1 and bad_id not in loaded["image_id"]
    assert loaded["captions"] == source["captions"][:3] + source["captions"][4:]


def test_missing_image_file_names_the_id(coco, source):
    root, info = coco
    (root / SPLIT / f"{int(info['ids'][0]):012d}.png").unlink()
    with pytest.raises(ValueError, match=f"image id {info['ids'][0]} not found"):
        load_coco_folder(root, split=SPLIT)
    with pytest.warns(UserWarning, match=f"ids {info['ids'][0]}"):
        assert len(load_coco_folder(root, split=SPLIT, skip_bad=True)) == len(source) - 1


def test_size_mismatch_with_the_annotations_names_the_id(coco):
    root, info = coco
    edit_json(info["files"][f"captions_{SPLIT}.json"], lambda d: d["images"][1].update(width=65))
    with pytest.raises(ValueError, match=f"image id {info['ids'][1]} .* is 64x64 but the annotations say 65x64"):
        load_coco_folder(root, split=SPLIT)


def test_truncated_image_is_caught_when_verifying(coco):
    root, info = coco
    path = root / SPLIT / f"{int(info['ids'][5]):012d}.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"cannot read image id {info['ids'][5]}"):
        load_coco_folder(root, split=SPLIT, verify_images=True)


def test_grayscale_and_rgba_files_load_as_rgb(coco):
    root, info = coco
    gray_path = root / SPLIT / f"{int(info['ids'][0]):012d}.png"
    PIL.Image.open(gray_path).convert("L").save(gray_path)
    rgba_path = root / SPLIT / f"{int(info['ids'][1]):012d}.png"
    PIL.Image.open(rgba_path).convert("RGBA").save(rgba_path)
    loaded = load_coco_folder(root, split=SPLIT)
    assert loaded[0]["image"].mode == "RGB" and loaded[1]["image"].mode == "RGB"
    pixels = np.asarray(loaded[0]["image"])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])  # gray replicated on the three channels


def test_image_without_caption_and_question_without_answer(coco):
    root, info = coco
    edit_json(info["files"][f"captions_{SPLIT}.json"],
              lambda d: d.update(annotations=[a for a in d["annotations"] if str(a["image_id"]) != info["ids"][2]]))
    with pytest.raises(ValueError, match=f"captions is missing.*sample '{info['ids'][2]}'"):
        load_coco_folder(root, split=SPLIT)
    edit_json(info["files"][f"v2_mscoco_{SPLIT}_annotations.json"], lambda d: d["annotations"].pop(0))
    with pytest.raises(ValueError, match="answers: question id 1 .* has no annotation"):
        load_coco_folder(root, split=SPLIT, skip_bad=True)
