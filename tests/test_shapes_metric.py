"""Object mentions on shapes: which (colour, shape) pairs a caption names, and precision / recall / F1 against the
objects drawn, checked by hand and against the shapes generator's own captions."""

from __future__ import annotations

import pytest

from leanvlp.data import make_shapes_dataset
from leanvlp.data.shapes import COLOURS, PLURALS, SHAPES, SIZES
from leanvlp.evaluation.generation import object_mentions, present_objects
from leanvlp.metrics import mentioned_objects, object_mention_scores

SPELLINGS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}


def mentions(caption: str) -> set[tuple[str, str]]:
    return mentioned_objects(caption, COLOURS, SPELLINGS, SIZES)


@pytest.mark.parametrize(("caption", "expected"), [
    ("two objects: a small red circle and a large blue square", {("red", "circle"), ("blue", "square")}),
    ("the blue square is above the red star", {("blue", "square"), ("red", "star")}),
    ("two red circles", {("red", "circle")}),  # plural
    ("a Large White Cross.", {("white", "cross")}),  # case and punctuation
    ("a large circle", set()),  # a shape without a colour names no pair
    ("a red thing next to a square", set()),  # the colour must precede the shape (sizes may stand between)
    ("a red circle and a red circle", {("red", "circle")}),  # a set per caption
    ("", set()),
])
def test_mentioned_pairs(caption, expected):
    assert mentions(caption) == expected


def test_scores_are_micro_averaged_over_the_corpus():
    said = [{("red", "circle"), ("blue", "star")}, {("green", "square")}]
    there = [{("red", "circle")}, {("green", "square"), ("black", "cross")}]
    scores = object_mention_scores(said, there)  # 2 correct of 3 named, 2 found of 3 present
    assert scores == pytest.approx({"object_precision": 2 / 3, "object_recall": 2 / 3, "object_f1": 2 / 3})
    assert object_mention_scores([set()], [{("red", "circle")}]) == \
        {"object_precision": 0.0, "object_recall": 0.0, "object_f1": 0.0}
    with pytest.raises(ValueError, match="2 captions but 1 images"):
        object_mention_scores(said, there[:1])


def test_the_generators_own_captions_name_only_present_objects():
    """Every reference caption of 200 images scores precision 1 (the parser reads the generator's language as it
    means it), and the caption listing every object scores recall 1."""
    data = make_shapes_dataset(200, image_size=32)
    present = present_objects(data)
    assert sum(len(p) for p in present.values()) > 400  # 1-4 objects per image
    for row in data:
        truth = present[row["image_id"]]
        assert truth == {(attrs[0], label) for label, attrs in zip(row["box_labels"], row["box_attributes"])}
        for caption in row["captions"]:
            assert mentions(caption) <= truth, (caption, truth)
        assert max(len(mentions(c)) for c in row["captions"]) >= min(2, len(truth))


def test_object_mentions_of_a_report_against_its_data():
    data = make_shapes_dataset(6, image_size=32)
    present = present_objects(data)
    listing = {iid: " and ".join(f"a {c} {s}" for c, s in sorted(objs)) for iid, objs in present.items()}
    ids = list(present)
    report = {"predictions": [listing[i] for i in ids], "image_ids": ids}
    assert object_mentions(report, data) == {"object_precision": 1.0, "object_recall": 1.0, "object_f1": 1.0}
    report["predictions"] = ["a purple star"] * len(ids)  # one wrong guess for every image
    scores = object_mentions(report, data)
    wrong = sum(("purple", "star") not in present[i] for i in ids)
    assert scores["object_precision"] == pytest.approx((len(ids) - wrong) / len(ids))
    assert object_mentions({**report, "image_ids": ["elsewhere"] * len(ids)}, data) == {}  # not this data's rows
