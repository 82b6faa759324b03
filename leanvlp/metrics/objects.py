"""Object mentions: precision / recall / F1 of the (colour, shape) pairs a caption names against those in the image.

CIDEr rewards any n-gram overlap with the references, so "a large black star to the left of a small yellow star"
scores well against an image of a purple cross and a yellow square. This metric asks only what a newcomer asks
first: are the objects named in the caption the objects in the picture?

A mention is a shape word (or its plural) whose preceding words, skipping size words, start with a colour word:
"a small red circle", "two red circles", "the blue square is above ...". A shape named without a colour
("a large circle") names no pair and is left out; each caption's mentions are a set (naming an object twice counts
once). Scores are micro-averaged over the corpus: precision = correct mentions / all mentions, recall = correct
mentions / all objects present, F1 their harmonic mean (0 when both are 0).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

_WORD = re.compile(r"[a-z]+")


def mentioned_objects(caption: str, colours: Iterable[str], shapes: Mapping[str, str],
                      skip: Iterable[str] = ()) -> set[tuple[str, str]]:
    """The (colour, shape) pairs `caption` names. `shapes` maps every spelling (singular, plural) to the shape;
    words in `skip` (sizes) may stand between the colour and the shape."""
    colours, skip = set(colours), set(skip)
    words = _WORD.findall(caption.lower())
    found: set[tuple[str, str]] = set()
    for i, word in enumerate(words):
        if word not in shapes:
            continue
        j = i - 1
        while j >= 0 and words[j] in skip:
            j -= 1
        if j >= 0 and words[j] in colours:
            found.add((words[j], shapes[word]))
    return found


def object_mention_scores(mentioned: Sequence[set[tuple[str, str]]],
                          present: Sequence[set[tuple[str, str]]]) -> dict[str, float]:
    """Micro-averaged `object_precision`, `object_recall` and `object_f1` of mentioned vs present pairs, per image."""
    if len(mentioned) != len(present):
        raise ValueError(f"object mentions: {len(mentioned)} captions but {len(present)} images of objects")
    correct = sum(len(m & p) for m, p in zip(mentioned, present))
    said, there = sum(len(m) for m in mentioned), sum(len(p) for p in present)
    precision = correct / said if said else 0.0
    recall = correct / there if there else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"object_precision": precision, "object_recall": recall, "object_f1": f1}
