"""Embedded default dataset: procedural shapes with captions, boxes, attributes and VQA.

Why: a newcomer (and the test suite) needs real image-text data offline, in seconds, with exact
annotations for every head (captioning, contrastive, boxes/classes/attributes, VQA). The images
are RGB, 1-4 non-overlapping objects (6 shapes x 8 colours x 2 sizes) on a textured, noisy
background; captions use a small regular vocabulary so a tiny model learns them on a CPU.

Determinism: image ``i`` of seed ``s`` is drawn from ``numpy.random.default_rng([s, i])`` only,
so the same ``(seed, index)`` always gives identical bytes, any index range can be built alone
(``start_index``), and chunks concatenate to the full set. Splits: use disjoint index ranges of
one seed, e.g. train = ``make_shapes_dataset(1000)``, test =
``make_shapes_dataset(200, start_index=1000)`` (``make_shapes_splits`` does this).

Relations: ``A left of B`` means A's box ends (x + w) at or before B's box starts (x); ``above``
likewise on y. Boxes are at least ``GAP`` pixels apart, so every pair has at least one relation.
Answers repeat the single correct answer 10 times (VQAv2 form with 10 agreeing annotators).

Grid variant (``layout="grid"``; the default ``"scatter"`` is unchanged): ``num_objects`` objects of distinct
shapes (default all six), each in a random cell of a ``GRID_CELLS`` x ``GRID_CELLS`` grid with a 1 px margin (so
boxes stay ``GAP`` apart) and a colour drawn with repeats (no colour follows from the others); every object
``object_size`` (default "small"). With ``questions="one_object_colour"`` each image has one question, the colour
of one object named by its shape: the answer sits in a few patches among distractors (text-guided merging's
benchmark). Its images come from ``default_rng([seed, index, 2])``, a stream of their own.

CLI: ``python -m leanvlp.data --num-images 1000 [--image-size 64 --seed 0 --out DIR]``.
"""

from __future__ import annotations

import argparse
import io
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
from datasets import Dataset, DatasetDict, concatenate_datasets
from tqdm.auto import tqdm

from .schema import FEATURES, VIDEO_FEATURES

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "GAP",
    "GRID_CELLS",
    "LAYOUTS",
    "HELD_OUT_START",
    "PLURALS",
    "QUESTION_SETS",
    "RELATIONS",
    "SHAPES_DATASET_ID",
    "SHAPES",
    "SIZES",
    "generate_shapes_row",
    "generate_video_row",
    "held_out_name",
    "make_shapes_dataset",
    "make_shapes_held_out",
    "make_shapes_splits",
    "make_video_shapes_dataset",
    "relation_holds",
    "save_sample_grid",
    "shapes_statistics",
]

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "cross": "crosses", "star": "stars"}
# Every colour has a channel outside the background's [50, 205] range, so no background pixel
# ever equals an object colour exactly.
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 20),
    "purple": (150, 40, 200),
    "orange": (250, 140, 0),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
SIZE_RANGE = {"small": (0.16, 0.22), "large": (0.30, 0.38)}  # side as a fraction of the image
BACKGROUND_RANGE = (50, 205)
GAP = 2  # minimum pixels between two boxes
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")  # up to six: the grid layout
DIRECTIONS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
NUM_ANSWERS = 10
CHUNK_ROWS = 1000
HELD_OUT_START = 1_000_000  # first index of the held-out images (make_shapes_held_out)
SHAPES_DATASET_ID = "leanvlp-shapes"  # its id in eval results: built in code, not a Hub dataset
LAYOUTS = ("scatter", "grid")  # scatter: the default set; grid: one object per cell (see the module docstring)
QUESTION_SETS = ("all", "one_object_colour")
GRID_CELLS = 4  # the grid layout's cells per side


# ----------------------------------------------------------------------------- drawing


@lru_cache(maxsize=None)
def _shape_mask(shape: str, side: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Boolean (side, side) mask of a shape and its tight box (x, y, w, h) inside the square."""
    c = (np.arange(side, dtype=np.float64) + 0.5) / side * 2 - 1  # pixel centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down), u: columns (right)
    if shape == "circle":
        mask = u * u + v * v <= 1.0
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":  # apex up
        mask = np.abs(u) <= (v + 1) / 2
    elif shape == "diamond":
        mask = np.abs(u) + np.abs(v) <= 1.0
    elif shape == "cross":
        mask = (np.abs(u) <= 0.34) | (np.abs(v) <= 0.34)
    elif shape == "star":  # six-pointed: an up and a down triangle
        up = (v <= 0.5) & (np.abs(u) <= 0.866 * (v + 1) / 1.5)
        down = (v >= -0.5) & (np.abs(u) <= 0.866 * (1 - v) / 1.5)
        mask = up | down
    else:
        raise ValueError(f"shape: unknown shape {shape!r}; known: {SHAPES}")
    rows, cols = np.nonzero(mask)
    box = (int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1))
    mask.setflags(write=False)
    return mask, box


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (size, 1) rows and (1, size) columns."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    return t[:, None], t[None, :]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted textured background (gradient, stripes, checker or blobs) plus pixel noise; (S, S, 3) float32."""
    yy, xx = _grid(size)
    base = rng.uniform(85, 170, 3).astype(np.float32)
    tint = rng.uniform(-1, 1, 3).astype(np.float32)
    kind = int(rng.integers(4))
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy  # (S, S)
    if kind == 0:  # gradient
        pattern = t - t.mean()
    elif kind == 1:  # stripes
        pattern = 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 2 * np.pi))
    elif kind == 2:  # checker
        f = int(rng.integers(3, 8))
        pattern = (((yy * f).astype(np.int32) + (xx * f).astype(np.int32)) % 2) - 0.5
    else:  # soft blobs
        pattern = np.zeros((size, size), dtype=np.float32)
        for cy, cx in rng.uniform(0, 1, (3, 2)):
            pattern = pattern + np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        pattern = pattern - pattern.mean()
    image = base + rng.uniform(30, 60) * pattern[..., None].astype(np.float32) * tint
    image = image + rng.normal(0, 7, (size, size, 3)).astype(np.float32)
    return np.clip(image, *BACKGROUND_RANGE)


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _side(rng: np.random.Generator, size_name: str, image_size: int) -> int:
    lo, hi = SIZE_RANGE[size_name]
    return max(5, int(round(rng.uniform(lo, hi) * image_size)))


def _separated(a: tuple, b: tuple, gap: int = GAP) -> bool:
    """True when boxes a, b (x, y, w, h) are at least `gap` pixels apart on x or on y."""
    return (a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0]
            or a[1] + a[3] + gap <= b[1] or b[1] + b[3] + gap <= a[1])


def relation_holds(a: list[float], b: list[float], relation: str) -> bool:
    """Whether box a (x, y, w, h) is `relation` box b, for relation in RELATIONS."""
    if relation == "to the left of":
        return a[0] + a[2] <= b[0]
    if relation == "to the right of":
        return b[0] + b[2] <= a[0]
    if relation == "above":
        return a[1] + a[3] <= b[1]
    if relation == "below":
        return b[1] + b[3] <= a[1]
    raise ValueError(f"relation: unknown relation {relation!r}; known: {RELATIONS}")


# ----------------------------------------------------------------------------- language


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(obj: dict, with_size: bool) -> str:
    return f"{obj['size']} {obj['colour']} {obj['shape']}" if with_size else f"{obj['colour']} {obj['shape']}"


def _listing(objects: list[dict], with_size: bool) -> str:
    names = [_article(_describe(o, with_size)) for o in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _captions(rng: np.random.Generator, objects: list[dict]) -> list[str]:
    """3-5 distinct captions drawn from a pool of regular templates."""
    n = len(objects)
    pool = [
        _listing(objects, True) if n == 1 else f"{NUMBER_WORDS[n]} objects: {_listing(objects, True)}",
        _listing(objects, False),
        "there is " + _article(_describe(objects[int(rng.integers(n))], False)),
        f"an image with {NUMBER_WORDS[n]} object" + ("s" if n > 1 else ""),
    ]
    if n == 1:
        pool.append(_article(f"{objects[0]['size']} {objects[0]['shape']}"))
        pool.append(f"a single {_describe(objects[0], False)}")
    else:
        for with_size, form in ((True, "{a} {rel} {b}"), (False, "the {a} is {rel} the {b}")):
            i, j = rng.choice(n, 2, replace=False)
            a, b = objects[int(i)], objects[int(j)]
            rel = _pick_relation(rng, a["box"], b["box"])
            a_text, b_text = _describe(a, with_size), _describe(b, with_size)
            if form.startswith("{a}"):
                a_text, b_text = _article(a_text), _article(b_text)
            pool.append(form.format(a=a_text, rel=rel, b=b_text))
    pool = list(dict.fromkeys(pool))  # distinct, order kept
    k = min(len(pool), int(rng.integers(3, 6)))
    return [pool[int(i)] for i in rng.permutation(len(pool))[:k]]


def _pick_relation(rng: np.random.Generator, a: list[float], b: list[float]) -> str:
    true = [r for r in RELATIONS if relation_holds(a, b, r)]
    return true[int(rng.integers(len(true)))]


def _unique(objects: list[dict], obj: dict, keys: tuple[str, ...]) -> bool:
    return sum(all(o[k] == obj[k] for k in keys) for o in objects) == 1


def _colour_question(objects: list[dict], order: list[dict]) -> tuple[str, str] | None:
    """(question, answer) on the colour of the first object in `order` that its shape (plus size) names uniquely."""
    for o in order:
        if _unique(objects, o, ("shape",)):
            return f"what color is the {o['shape']}?", o["colour"]
        if _unique(objects, o, ("size", "shape")):
            return f"what color is the {o['size']} {o['shape']}?", o["colour"]
    return None


def _questions(rng: np.random.Generator, objects: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One question per kind (colour, shape, count, existence, relation) that the image allows."""
    qa: list[tuple[str, str]] = []
    n = len(objects)
    order = [objects[int(i)] for i in rng.permutation(n)]
    colour = _colour_question(objects, order)
    if colour is not None:
        qa.append(colour)
    for o in order:  # shape: refer to the object by its colour (plus size)
        if _unique(objects, o, ("colour",)):
            qa.append((f"what shape is the {o['colour']} object?", o["shape"]))
            break
        if _unique(objects, o, ("size", "colour")):
            qa.append((f"what shape is the {o['size']} {o['colour']} object?", o["shape"]))
            break
    kind = int(rng.integers(3))  # count
    if kind == 0:
        qa.append(("how many objects are there?", str(n)))
    elif kind == 1:
        colour = order[0]["colour"] if rng.random() < 0.8 else list(COLOURS)[int(rng.integers(len(COLOURS)))]
        qa.append((f"how many {colour} objects are there?", str(sum(o["colour"] == colour for o in objects))))
    else:
        shape = order[0]["shape"] if rng.random() < 0.8 else SHAPES[int(rng.integers(len(SHAPES)))]
        qa.append((f"how many {PLURALS[shape]} are there?", str(sum(o["shape"] == shape for o in objects))))
    present = {(o["colour"], o["shape"]) for o in objects}  # existence, yes or no at even odds
    if rng.random() < 0.5:
        colour, shape = order[0]["colour"], order[0]["shape"]
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
    qa.append((f"is there {_article(colour + ' ' + shape)}?", "yes" if (colour, shape) in present else "no"))
    if n >= 2:  # relation, yes or no
        a, b = order[0], order[1]
        true = [r for r in RELATIONS if relation_holds(a["box"], b["box"], r)]
        false = [r for r in RELATIONS if r not in true]
        pick = true if rng.random() < 0.5 or not false else false
        rel = pick[int(rng.integers(len(pick)))]
        answer = "yes" if rel in true else "no"
        qa.append((f"is the {_describe(a, False)} {rel} the {_describe(b, False)}?", answer))
    return [q for q, _ in qa], [[a] * NUM_ANSWERS for _, a in qa]


# ----------------------------------------------------------------------------- images


def _place_objects(rng: np.random.Generator, image_size: int, count: int) -> list[dict]:
    """Draw `count` objects with distinct (colour, shape) and boxes at least GAP apart (fewer if no room)."""
    objects: list[dict] = []
    combos = rng.permutation(len(SHAPES) * len(COLOURS))[:count]
    colour_names = list(COLOURS)
    for combo in combos:
        shape, colour = SHAPES[int(combo) % len(SHAPES)], colour_names[int(combo) // len(SHAPES)]
        size = SIZES[int(rng.integers(2))]
        side = min(_side(rng, size, image_size), image_size)
        mask, (bx, by, bw, bh) = _shape_mask(shape, side)
        for _ in range(30):
            px, py = (int(v) for v in rng.integers(0, image_size - side + 1, 2))
            box = (px + bx, py + by, bw, bh)
            if all(_separated(box, o["box"]) for o in objects):
                objects.append({"shape": shape, "colour": colour, "size": size,
                                "box": [float(v) for v in box], "mask": mask, "at": (px, py)})
                break
    return objects


def _grid_objects(rng: np.random.Generator, image_size: int, count: int, size: str) -> list[dict]:
    """`count` objects of distinct shapes, one per random grid cell, 1 px inside it; colours drawn with repeats."""
    cell = image_size // GRID_CELLS
    colour_names = list(COLOURS)
    objects = []
    cells = rng.permutation(GRID_CELLS * GRID_CELLS)[:count]
    for shape_index, cell_index in zip(rng.permutation(len(SHAPES))[:count], cells):
        shape, colour = SHAPES[int(shape_index)], colour_names[int(rng.integers(len(colour_names)))]
        side = _side(rng, size, image_size)
        mask, (bx, by, bw, bh) = _shape_mask(shape, side)
        px = int(cell_index) % GRID_CELLS * cell + int(rng.integers(1, cell - side))  # in [1, cell - side - 1]
        py = int(cell_index) // GRID_CELLS * cell + int(rng.integers(1, cell - side))
        objects.append({"shape": shape, "colour": colour, "size": size,
                        "box": [float(px + bx), float(py + by), float(bw), float(bh)], "mask": mask, "at": (px, py)})
    return objects


def _paint(canvas: np.ndarray, obj: dict, at: tuple[int, int]) -> None:
    mask = obj["mask"]
    px, py = at
    region = canvas[py:py + mask.shape[0], px:px + mask.shape[1]]
    region[mask] = COLOURS[obj["colour"]]


def _check_variant(image_size: int, layout: str, num_objects: int | None, object_size: str | None,
                   questions: str) -> None:
    """Fail early on an unknown or impossible variant option, naming it and its value."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
    if questions not in QUESTION_SETS:
        raise ValueError(f"questions: must be one of {QUESTION_SETS}, got {questions!r}")
    if object_size is not None and object_size not in SIZES:
        raise ValueError(f"object_size: must be one of {SIZES} or None, got {object_size!r}")
    if layout == "scatter":
        for name, value, default in (("num_objects", num_objects, None), ("object_size", object_size, None),
                                     ("questions", questions, "all")):
            if value != default:
                raise ValueError(f"{name}={value!r} needs layout='grid' (the scatter layout draws 1-4 objects of "
                                 "either size and asks every kind of question)")
        return
    if num_objects is not None and (not isinstance(num_objects, int) or isinstance(num_objects, bool)
                                    or not 1 <= num_objects <= len(SHAPES)):
        raise ValueError(f"num_objects: must be an int in [1, {len(SHAPES)}] (one object per shape), "
                         f"got {num_objects!r}")
    size = object_size or "small"
    cell, largest = image_size // GRID_CELLS, max(5, round(SIZE_RANGE[size][1] * image_size))
    if largest > cell - 2:
        raise ValueError(f"object_size={size!r}: objects up to {largest} px do not fit a {cell} px grid cell with a "
                         f"1 px margin at image_size={image_size}; use 'small' or a larger image_size")


def generate_shapes_row(index: int, seed: int = 0, image_size: int = 64, layout: str = "scatter",
                        num_objects: int | None = None, object_size: str | None = None,
                        questions: str = "all") -> dict[str, Any]:
    """Row `index` of the shapes set of `seed`, in the schema (image as PNG ``{"bytes", "path"}``).

    `layout`, `num_objects`, `object_size`, `questions`: the grid variant (module docstring); the defaults give
    the scatter set, byte for byte as before the variant existed.
    """
    if image_size < 32:
        raise ValueError(f"image_size: must be >= 32 so small shapes stay recognisable, got {image_size}")
    _check_variant(image_size, layout, num_objects, object_size, questions)
    if layout == "grid":
        rng = np.random.default_rng([seed, index, 2])  # the trailing 2 keeps grid images apart from the rest
        canvas = _background(rng, image_size).astype(np.uint8)
        objects = _grid_objects(rng, image_size, num_objects or len(SHAPES), object_size or "small")
        image_id = f"shapes-grid-{seed}-{index}"
    else:
        rng = np.random.default_rng([seed, index])
        canvas = _background(rng, image_size).astype(np.uint8)
        objects = _place_objects(rng, image_size, int(rng.integers(1, 5)))
        image_id = f"shapes-{seed}-{index}"
    for obj in objects:
        _paint(canvas, obj, obj["at"])
    if questions == "one_object_colour":  # grid shapes are distinct, so the shape names the object
        order = [objects[int(i)] for i in rng.permutation(len(objects))]
        question, answer = _colour_question(objects, order)
        questions_, answers = [question], [[answer] * NUM_ANSWERS]
    else:
        questions_, answers = _questions(rng, objects)
    return {
        "image": {"bytes": _encode_png(canvas), "path": None},
        "image_id": image_id,
        "captions": _captions(rng, objects),
        "boxes": [o["box"] for o in objects],
        "box_labels": [o["shape"] for o in objects],
        "box_attributes": [[o["colour"], o["size"]] for o in objects],
        "box_features": [],
        "questions": questions_,
        "answers": answers,
    }


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}: must be an int >= 0, got {value!r}")


def make_shapes_dataset(num_images: int, image_size: int = 64, seed: int = 0, start_index: int = 0,
                        progress: bool = False, layout: str = "scatter", num_objects: int | None = None,
                        object_size: str | None = None, questions: str = "all") -> Dataset:
    """Build rows ``start_index .. start_index + num_images - 1`` of the shapes set as a ``datasets.Dataset``.

    `layout="grid"` with `num_objects`, `object_size` and `questions` builds the many-object variant (module
    docstring), e.g. ``make_shapes_dataset(600, image_size=112, layout="grid", questions="one_object_colour")``.
    """
    _check_count("num_images", num_images)
    _check_count("start_index", start_index)
    _check_variant(image_size, layout, num_objects, object_size, questions)
    variant = dict(layout=layout, num_objects=num_objects, object_size=object_size, questions=questions)
    chunks, columns = [], {name: [] for name in FEATURES}
    indices = range(start_index, start_index + num_images)
    for index in tqdm(indices, desc="shapes", disable=not progress, unit="img"):
        for name, value in generate_shapes_row(index, seed, image_size, **variant).items():
            columns[name].append(value)
        if len(columns["image"]) == CHUNK_ROWS:  # to Arrow in chunks: Python rows cost ~10x their Arrow size
            chunks.append(Dataset.from_dict(columns, features=FEATURES))
            columns = {name: [] for name in FEATURES}
    if columns["image"] or not chunks:
        chunks.append(Dataset.from_dict(columns, features=FEATURES))
    return chunks[0] if len(chunks) == 1 else concatenate_datasets(chunks)


def make_shapes_held_out(num_images: int, image_size: int = 64, seed: int = 0) -> Dataset:
    """The held-out images that train.py (before / after) and eval.py both score: rows `HELD_OUT_START` on.

    One definition for both, so "held-out" in a card means the same images whichever script wrote it; training
    draws from index 0 on, so the two never overlap below `HELD_OUT_START` training images.
    """
    return make_shapes_dataset(num_images, image_size=image_size, seed=seed, start_index=HELD_OUT_START)


def held_out_name() -> str:
    """The held-out split's display name (model cards); the split `held-out[:N]` says how many images."""
    return f"leanvlp shapes (procedural; held-out images from index {HELD_OUT_START:,})"


def make_shapes_splits(sizes: dict[str, int], image_size: int = 64, seed: int = 0) -> DatasetDict:
    """Disjoint splits from consecutive index ranges of one seed, e.g. ``{"train": 1000, "test": 200}``."""
    splits, start = {}, 0
    for name, count in sizes.items():
        splits[name] = make_shapes_dataset(count, image_size=image_size, seed=seed, start_index=start)
        start += count
    return DatasetDict(splits)


# ----------------------------------------------------------------------------- video


def _motion_clause(mover: dict, form: str) -> str:
    obj = _describe(mover, False)
    return form.format(obj=obj, a_obj=_article(obj), a_sized=_article(_describe(mover, True)),
                       dir=DIRECTIONS[mover["direction"]])


def generate_video_row(index: int, seed: int = 0, num_frames: int = 4, image_size: int = 64) -> dict[str, Any]:
    """Clip `index`: 1-2 shapes moving left/right/up/down over a static textured background."""
    if num_frames < 2:
        raise ValueError(f"num_frames: need at least 2 frames to show motion, got {num_frames}")
    if image_size < 32:
        raise ValueError(f"image_size: must be >= 32, got {image_size}")
    rng = np.random.default_rng([seed, index, 1])  # the trailing 1 keeps clips apart from still images
    background = _background(rng, image_size)
    colour_names = list(COLOURS)
    movers: list[dict] = []
    count = int(rng.integers(1, 3))
    shapes = rng.integers(len(SHAPES), size=count)
    for shape_index, colour_index in zip(shapes, rng.permutation(len(COLOURS))[:count]):  # distinct colours
        shape, colour = SHAPES[int(shape_index)], colour_names[int(colour_index)]
        size = SIZES[int(rng.integers(2))]
        side = _side(rng, size, image_size)
        mask, _ = _shape_mask(shape, side)
        direction = list(DIRECTIONS)[int(rng.integers(4))]
        travel = int(rng.uniform(0.25, 0.4) * image_size)
        dx, dy = {"left": (-travel, 0), "right": (travel, 0), "up": (0, -travel), "down": (0, travel)}[direction]
        for _ in range(30):
            x0 = int(rng.integers(max(0, -dx), image_size - side - max(0, dx) + 1))
            y0 = int(rng.integers(max(0, -dy), image_size - side - max(0, dy) + 1))
            swept = (min(x0, x0 + dx), min(y0, y0 + dy), side + abs(dx), side + abs(dy))
            if all(_separated(swept, m["swept"]) for m in movers):
                movers.append({"shape": shape, "colour": colour, "size": size, "mask": mask,
                               "start": (x0, y0), "step": (dx, dy), "direction": direction, "swept": swept})
                break
    frames = []
    for f in range(num_frames):
        canvas = np.clip(background + rng.normal(0, 4, background.shape), *BACKGROUND_RANGE).astype(np.uint8)
        for m in movers:
            t = f / (num_frames - 1)
            at = (m["start"][0] + round(t * m["step"][0]), m["start"][1] + round(t * m["step"][1]))
            _paint(canvas, m, at)
        frames.append({"bytes": _encode_png(canvas), "path": None})
    forms = ("{a_obj} moves {dir}", "{a_sized} is moving {dir}", "the {obj} goes {dir}")
    captions = [" and ".join(_motion_clause(m, form) for m in movers) for form in forms]
    return {"frames": frames, "image_id": f"video-shapes-{seed}-{index}", "captions": captions}


def make_video_shapes_dataset(num_clips: int, num_frames: int = 4, image_size: int = 64, seed: int = 0,
                              start_index: int = 0) -> Dataset:
    """Short clips of moving shapes with captions of the motion (``VIDEO_FEATURES`` schema)."""
    _check_count("num_clips", num_clips)
    _check_count("start_index", start_index)
    columns: dict[str, list] = {name: [] for name in VIDEO_FEATURES}
    for index in range(start_index, start_index + num_clips):
        for name, value in generate_video_row(index, seed, num_frames, image_size).items():
            columns[name].append(value)
    return Dataset.from_dict(columns, features=VIDEO_FEATURES)


# ----------------------------------------------------------------------------- statistics and CLI


def shapes_statistics(dataset: Dataset) -> dict[str, Any]:
    """Counts per shape/colour/size, objects/captions/questions per image and the answer distribution."""
    table = dataset.select_columns(["box_labels", "box_attributes", "captions", "questions", "answers"])[:]
    attributes = [a for per_image in table["box_attributes"] for a in per_image]
    return {
        "images": len(dataset),
        "shapes": Counter(label for per_image in table["box_labels"] for label in per_image),
        "colours": Counter(a[0] for a in attributes),
        "sizes": Counter(a[1] for a in attributes),
        "objects_per_image": Counter(len(x) for x in table["box_labels"]),
        "captions_per_image": Counter(len(x) for x in table["captions"]),
        "questions_per_image": Counter(len(x) for x in table["questions"]),
        "answers": Counter(a[0] for per_image in table["answers"] for a in per_image),
        "caption_vocabulary": len({w for per_image in table["captions"] for c in per_image for w in c.split()}),
    }


def save_sample_grid(dataset: Dataset, path: str | Path, count: int = 16, scale: int = 3) -> Path:
    """Save a PNG grid of the first `count` images, upscaled, with their boxes drawn."""
    count = min(count, len(dataset))
    if count == 0:
        raise ValueError("dataset: empty, nothing to draw")
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    first = dataset[0]["image"]
    cell_w, cell_h = first.width * scale, first.height * scale
    grid = PIL.Image.new("RGB", (columns * (cell_w + 4), rows * (cell_h + 4)), (255, 255, 255))
    for i in range(count):
        row = dataset[i]
        image = row["image"].resize((cell_w, cell_h), PIL.Image.NEAREST)
        draw = PIL.ImageDraw.Draw(image)
        for (x, y, w, h), label in zip(row["boxes"], row["box_labels"]):
            draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=(255, 0, 255))
            draw.text((x * scale + 1, y * scale + 1), label, fill=(255, 0, 255))
        grid.paste(image, ((i % columns) * (cell_w + 4), (i // columns) * (cell_h + 4)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _format_counter(counter: Counter) -> str:
    total = sum(counter.values()) or 1
    items = sorted(counter.items(), key=lambda kv: str(kv[0]))
    return ", ".join(f"{k}: {v} ({100 * v / total:.1f}%)" for k, v in items)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leanvlp.data",
                                     description="Build the embedded shapes dataset and print its statistics.")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-index", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="save the dataset (save_to_disk) and a sample grid here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dataset = make_shapes_dataset(args.num_images, image_size=args.image_size, seed=args.seed,
                                  start_index=args.start_index, progress=True)
    seconds = time.perf_counter() - start
    stats = shapes_statistics(dataset)
    print(f"built {stats['images']} images of {args.image_size}px (seed {args.seed}) in {seconds:.2f} s "
          f"({1000 * seconds / max(1, stats['images']):.2f} ms/image)")
    for key in ("shapes", "colours", "sizes", "objects_per_image", "captions_per_image", "questions_per_image",
                "answers"):
        print(f"{key}: {_format_counter(stats[key])}")
    print(f"caption vocabulary: {stats['caption_vocabulary']} words")
    if len(dataset):
        first = dataset[0]
        print("example captions:", first["captions"])
        print("example questions:", [(q, a[0]) for q, a in zip(first["questions"], first["answers"])])
    if args.out is not None:
        dataset.save_to_disk(str(args.out / "dataset"))
        grid = save_sample_grid(dataset, args.out / "samples.png")
        print(f"saved dataset to {args.out / 'dataset'} and a sample grid to {grid}")



if __name__ == "__main__":  # the older spelling; `python -m leanvlp.data` runs the same without runpy's warning
    main()
