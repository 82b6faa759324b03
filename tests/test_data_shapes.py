"""The embedded shapes dataset: determinism, exact boxes, true captions and VQA answers, video, CLI, speed."""

import hashlib
import itertools
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from datasets import Image, load_from_disk

from leanvlp.data import FEATURES, VIDEO_FEATURES, make_shapes_dataset, make_shapes_splits, make_video_shapes_dataset
from leanvlp.data.schema import validate_row
import leanvlp.data.shapes as shapes_module
from leanvlp.data.shapes import COLOURS, SHAPES, generate_shapes_row

SIZES = ("small", "large")
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}
DESC = rf"(?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLOURS)}) )?({'|'.join(SHAPES)})\b"
REL = r"(to the left of|to the right of|above|below)"


def digest(dataset) -> str:
    """sha256 over the encoded image bytes and every other field of every row."""
    raw = dataset.cast_column("image", Image(decode=False))
    h = hashlib.sha256()
    for row in raw:
        h.update(row["image"]["bytes"])
        h.update(repr([row[k] for k in FEATURES if k != "image"]).encode())
    return h.hexdigest()


def objects_of(row) -> list[dict]:
    return [{"shape": label, "colour": attrs[0], "size": attrs[1], "box": box}
            for box, label, attrs in zip(row["boxes"], row["box_labels"], row["box_attributes"])]


def matches(obj: dict, size: str | None, colour: str | None, shape: str) -> bool:
    return obj["shape"] == shape and colour in (None, obj["colour"]) and size in (None, obj["size"])


def holds(a: list[float], b: list[float], relation: str) -> bool:
    """Relation between boxes, recomputed here: 'left of' = a ends at or before b starts."""
    ax0, ay0, ax1, ay1 = a[0], a[1], a[0] + a[2], a[1] + a[3]
    bx0, by0, bx1, by1 = b[0], b[1], b[0] + b[2], b[1] + b[3]
    truth = {"to the left of": ax1 <= bx0, "to the right of": bx1 <= ax0, "above": ay1 <= by0, "below": by1 <= ay0}
    return truth[relation]


@pytest.fixture(scope="module")
def shapes():
    return make_shapes_dataset(300, image_size=64, seed=3)


def test_same_seed_same_bytes_other_seed_differs():
    a, b = make_shapes_dataset(20, seed=7), make_shapes_dataset(20, seed=7)
    c = make_shapes_dataset(20, seed=8)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    assert a.features == FEATURES


def test_chunks_concatenate_to_the_full_set_and_splits_are_disjoint(monkeypatch):
    full = make_shapes_dataset(12, seed=1)
    monkeypatch.setattr(shapes_module, "CHUNK_ROWS", 5)  # Arrow chunks of 5, 5 and 2 rows
    assert digest(make_shapes_dataset(12, seed=1)) == digest(full)
    tail = make_shapes_dataset(5, seed=1, start_index=7)
    assert digest(full.select(range(7, 12))) == digest(tail)
    splits = make_shapes_splits({"train": 6, "test": 4}, seed=1)
    assert digest(splits["train"]) == digest(full.select(range(6)))
    assert digest(splits["test"]) == digest(full.select(range(6, 10)))
    assert not set(splits["train"]["image_id"]) & set(splits["test"]["image_id"])


def test_rows_validate_and_cover_the_attribute_space(shapes):
    for i, row in enumerate(shapes):
        validate_row(row, i)
        assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
        assert 1 <= len(row["boxes"]) <= 4
        assert 3 <= len(row["captions"]) <= 5 and len(set(row["captions"])) == len(row["captions"])
        assert all(len(a) == 10 and len(set(a)) == 1 for a in row["answers"])
    labels = [label for row in shapes for label in row["box_labels"]]
    attrs = [a for row in shapes for a in row["box_attributes"]]
    assert set(labels) == set(SHAPES) and len(SHAPES) >= 5
    assert {a[0] for a in attrs} == set(COLOURS) and len(COLOURS) == 8
    assert {a[1] for a in attrs} == set(SIZES)
    assert {len(row["boxes"]) for row in shapes} == {1, 2, 3, 4}


def test_boxes_are_tight_around_the_drawn_object_and_do_not_overlap(shapes):
    for row in shapes.select(range(100)):
        pixels = np.asarray(row["image"])  # (H, W, 3)
        objects = objects_of(row)
        for obj in objects:
            x, y, w, h = (int(v) for v in obj["box"])
            assert obj["box"] == [float(x), float(y), float(w), float(h)]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
            same = np.all(pixels == COLOURS[obj["colour"]], axis=-1)  # (H, W)
            ys, xs = np.nonzero(same[y:y + h, x:x + w])
            # The colour fills the box tightly: it touches all four edges of the box.
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, w, h), row["image_id"]
        for colour in {o["colour"] for o in objects}:  # no object colour outside its boxes
            same = np.all(pixels == COLOURS[colour], axis=-1)
            for o in objects:
                if o["colour"] == colour:
                    x, y, w, h = (int(v) for v in o["box"])
                    same[y:y + h, x:x + w] = False
            assert not same.any(), row["image_id"]
        for a, b in itertools.combinations(objects, 2):
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, row["image_id"]
            assert (a["colour"], a["shape"]) != (b["colour"], b["shape"])


def test_background_is_textured_not_flat(shapes):
    pixels = np.asarray(shapes[0]["image"]).astype(float)
    assert pixels.std(axis=(0, 1)).min() > 3.0


def test_captions_mention_only_objects_present_and_true_relations(shapes):
    seen_relations = 0
    for row in shapes:
        objects = objects_of(row)
        for caption in row["captions"]:
            mentions = re.findall(DESC, caption)
            assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", caption), caption  # a/an agree
            count = re.search(r"\b(one|two|three|four) objects?\b", caption)
            assert mentions or count, caption
            for size, colour, shape in mentions:
                assert any(matches(o, size or None, colour or None, shape) for o in objects), (caption, objects)
            if count:
                assert WORDS[count.group(1)] == len(objects), (caption, objects)
            if re.match(r"(two|three|four) objects: ", caption):  # a full listing names every object once
                assert sorted(m[2] + m[1] for m in mentions) == sorted(o["shape"] + o["colour"] for o in objects)
            for rel in re.finditer(rf"{DESC} (?:is )?{REL} (?:a |an |the ){DESC}", caption):
                s1, c1, sh1, relation, s2, c2, sh2 = rel.groups()
                assert any(holds(a["box"], b["box"], relation)
                           for a in objects if matches(a, s1 or None, c1 or None, sh1)
                           for b in objects if matches(b, s2 or None, c2 or None, sh2)), (caption, objects)
                seen_relations += 1
    assert seen_relations > 100


def answer_of(question: str, objects: list[dict]) -> str:
    """Recompute the answer of a question from the row's boxes, labels and attributes."""
    if m := re.fullmatch(rf"what color is the {DESC}\?", question):
        (found,) = [o for o in objects if matches(o, m[1], m[2], m[3])]  # the reference must be unique
        return found["colour"]
    if m := re.fullmatch(rf"what shape is the (?:(small|large) )?({'|'.join(COLOURS)}) object\?", question):
        (found,) = [o for o in objects if o["colour"] == m[2] and m[1] in (None, o["size"])]
        return found["shape"]
    if question == "how many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(rf"how many ({'|'.join(COLOURS)}) objects are there\?", question):
        return str(sum(o["colour"] == m[1] for o in objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        (shape,) = [s for s in SHAPES if m[1] in (s + "s", s + "es")]
        return str(sum(o["shape"] == shape for o in objects))
    if m := re.fullmatch(rf"is there an? {DESC}\?", question):
        return "yes" if any(matches(o, m[1], m[2], m[3]) for o in objects) else "no"
    if m := re.fullmatch(rf"is the {DESC} {REL} the {DESC}\?", question):
        (a,) = [o for o in objects if matches(o, m[1], m[2], m[3])]
        (b,) = [o for o in objects if matches(o, m[5], m[6], m[7])]
        return "yes" if holds(a["box"], b["box"], m[4]) else "no"
    raise AssertionError(f"unparsed question {question!r}")


def test_vqa_answers_are_correct_for_their_image(shapes):
    kinds: dict[str, set] = {}
    for row in shapes:
        objects = objects_of(row)
        for question, answers in zip(row["questions"], row["answers"]):
            assert answers == [answer_of(question, objects)] * 10, (question, objects)
            kinds.setdefault(" ".join(question.split()[:2]), set()).add(answers[0])
    assert {"what color", "what shape", "how many", "is there", "is the"} <= set(kinds)
    assert kinds["is there"] == {"yes", "no"} and kinds["is the"] == {"yes", "no"}


def test_video_captions_match_the_motion():
    clips = make_video_shapes_dataset(24, num_frames=4, seed=2)
    assert clips.features == VIDEO_FEATURES
    assert digest_video(clips) == digest_video(make_video_shapes_dataset(24, num_frames=4, seed=2))
    directions = set()
    for clip in clips:
        frames = [np.asarray(f) for f in clip["frames"]]
        assert len(frames) == 4 and all(f.shape == (64, 64, 3) for f in frames)
        for caption in clip["captions"]:
            assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", caption), caption
            clauses = re.findall(rf"(?:a|an|the) {DESC} (?:moves|is moving|goes) (to the left|to the right|up|down)",
                                 caption)
            assert clauses and len(clauses) == caption.count(" and ") + 1, caption
            for size, colour, shape, direction in clauses:
                centres = []
                for f in frames:
                    ys, xs = np.nonzero(np.all(f == COLOURS[colour], axis=-1))
                    assert len(xs) > 0, caption
                    centres.append((xs.mean(), ys.mean()))
                dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
                expected = {"to the left": dx < -8 and abs(dy) < 1, "to the right": dx > 8 and abs(dy) < 1,
                            "up": dy < -8 and abs(dx) < 1, "down": dy > 8 and abs(dx) < 1}
                assert expected[direction], (caption, dx, dy)
                directions.add(direction)
    assert directions == {"to the left", "to the right", "up", "down"}


def digest_video(clips) -> str:
    h = hashlib.sha256()
    for clip in clips.cast_column("frames", [Image(decode=False)]):
        for frame in clip["frames"]:
            h.update(frame["bytes"])
        h.update(repr(clip["captions"]).encode())
    return h.hexdigest()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_images"):
        make_shapes_dataset(-1)
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes_row(0, image_size=16)
    with pytest.raises(ValueError, match="num_frames"):
        make_video_shapes_dataset(1, num_frames=1)


def test_500_images_build_fast():
    start = time.process_time()
    dataset = make_shapes_dataset(500, seed=11)
    seconds = time.process_time() - start
    assert len(dataset) == 500
    assert seconds < 5.0, f"500 images took {seconds:.2f} s of CPU (budget: 10,000 in 60 s)"


@pytest.mark.slow
def test_cli_builds_prints_statistics_and_saves(tmp_path):
    result = subprocess.run([sys.executable, "-m", "leanvlp.data.shapes", "--num-images", "12", "--seed", "4",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for key in ("built 12 images", "shapes:", "colours:", "sizes:", "objects_per_image:", "captions_per_image:",
                "questions_per_image:", "answers:"):
        assert key in result.stdout, result.stdout
    assert "shapes:" in result.stderr  # the tqdm bar
    saved = load_from_disk(str(tmp_path / "dataset"))
    assert digest(saved) == digest(make_shapes_dataset(12, seed=4))
    from PIL import Image as PILImage
    with PILImage.open(tmp_path / "samples.png") as grid:
        assert grid.format == "PNG" and grid.width >= 4 * 64 * 3
