"""eval.py's flags (`EvalArguments`) and the eval set they name."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

from ..cli_args import HelpGroup, LeanArgumentParser
from ..data.shapes import SHAPES_DATASET_ID, held_out_name, make_shapes_held_out
from ..data.pairs import load_split


TASKS = ("caption", "vqa", "retrieval", "speed")
DATA_KINDS = ("shapes", "coco", "hf")
DEFAULT_SPLITS = {"shapes": "held-out", "coco": "val2017", "hf": "validation"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class EvalArguments:
    """What to evaluate, on what, how. `python eval.py --help` lists them."""

    model: str = field(metadata={"help": "folder written by save_pretrained / train.py"})
    task: str = field(metadata={"help": f"one of {TASKS}"})
    data: str = field(default="shapes", metadata={"help": f"one of {DATA_KINDS}"})
    data_path: str | None = field(default=None, metadata={"help": "COCO folder, or datasets path / hub id"})
    split: str | None = field(default=None, metadata={
        "help": "split to evaluate (default per kind: " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_SPLITS.items())
        + ")"})
    image_column: str = field(default="image", metadata={"help": "hf: the image column"})
    caption_column: str | None = field(default=None, metadata={"help": "hf: the caption column"})
    num_images: int = field(default=100, metadata={"help": "evaluate the first N images of the split"})
    batch_size: int = field(default=32, metadata={"help": "images per forward / generate call"})
    max_new_tokens: int = field(default=20, metadata={"help": "longest generated caption / answer"})
    num_beams: int = field(default=1, metadata={"help": "beam search width (1: greedy)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    dtype: str = field(default="fp32", metadata={"help": f"one of {tuple(DTYPES)}"})
    sweep: str | None = field(default=None, metadata={"help": "speed task: comma-separated values, e.g. '0,4,8,16'"})
    warmup: int = field(default=1, metadata={"help": "speed task: untimed calls per setting before timing"})
    repeats: int = field(default=5, metadata={
        "help": "speed task: timed calls per setting; throughput is their median, min and max are reported"})
    progress: bool = field(default=True, metadata={"help": "show progress bars (--no_progress hides every bar)"})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task: unknown task {self.task!r}; choose one of {TASKS}")
        if self.data not in DATA_KINDS:
            raise ValueError(f"--data: unknown dataset kind {self.data!r}; choose one of {DATA_KINDS}")
        if self.data != "shapes" and self.data_path is None:
            raise ValueError(f"--data {self.data}: --data_path is required")
        for name in ("num_images", "batch_size", "max_new_tokens", "num_beams", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.sweep is not None and self.task != "speed":
            raise ValueError(f"--sweep goes with --task speed (got --task {self.task})")
        if self.split is None:
            self.split = DEFAULT_SPLITS[self.data]

    @property
    def sweep_values(self) -> list[int | float]:
        """'0,4,8' -> [0, 4, 8] (MergeBridge r); '1.0,0.5' -> [1.0, 0.5] (PatchAlign keep ratio)."""
        if self.sweep is None:
            return []
        parts = [v.strip() for v in self.sweep.split(",") if v.strip()]
        try:
            values = [float(v) if "." in v else int(v) for v in parts]
        except ValueError:
            values = []
        if not values or any(v < 0 for v in values):
            raise ValueError(f"--sweep: expected comma-separated integers (MergeBridge r, e.g. '0,4,8,16') or keep "
                             f"ratios (PatchAlign, e.g. '1.0,0.7,0.5'), got {self.sweep!r}")
        return values


def build_parser() -> LeanArgumentParser:
    """eval.py's parser: every flag in titled groups, with its help text and default."""
    return LeanArgumentParser(
        [EvalArguments], prog="leanvlp-eval",
        description="Evaluate a saved leanvlp model (caption, vqa, retrieval, speed); the results go into the "
                    "folder's eval_results.json and its model card.",
        examples=["python eval.py --model outputs/tiny-merge-bridge --task caption",
                  "python eval.py --model outputs/tiny-merge-bridge --task speed --sweep 0,4,8,16",
                  "python eval.py --model DIR --task vqa --data coco --data_path /data/coco --split val2017"],
        groups=[HelpGroup("what", EvalArguments, ("model", "task")),
                HelpGroup("data", EvalArguments, ("data", "data_path", "split", "image_column", "caption_column",
                                                  "num_images")),
                HelpGroup("generation", EvalArguments, ("batch_size", "max_new_tokens", "num_beams")),
                HelpGroup("speed", EvalArguments, ("sweep", "warmup", "repeats")),
                HelpGroup("device and output", EvalArguments, ("device", "dtype", "progress"))])


def parse_args(argv: Sequence[str] | None = None) -> EvalArguments:
    """EvalArguments from the command line (`argv`, default sys.argv[1:]); bad values fail in __post_init__."""
    (args,) = build_parser().parse(list(sys.argv[1:] if argv is None else argv))
    return args


def load_eval_data(args: EvalArguments, image_size: int) -> Dataset:
    """The first `num_images` images of the eval set, in leanvlp's row schema; an empty set is an error."""
    if args.data == "shapes":
        return make_shapes_held_out(args.num_images, image_size=max(image_size, 32))  # train.py's held-out split
    data = load_split(args.data, args.data_path, args.split, args.image_column, args.caption_column)
    if len(data) == 0:
        raise ValueError(f"dataset {args.data_path!r} (split {args.split!r}) is empty: no images to evaluate")
    return data.select(range(min(args.num_images, len(data))))


def dataset_fields(kind: str, data_path: str | None, split: str, num_images: int) -> dict[str, Any]:
    """An eval_results.json entry's dataset id, display name and split, the same from train.py and eval.py. The
    split names the images scored, `held-out[:100]` (datasets' slice syntax: the first 100), so runs on different
    numbers of images are different model-index entries. Shapes is `SHAPES_DATASET_ID` (built in code, no Hub id)."""
    sliced = f"{split}[:{num_images}]"
    if kind == "shapes":
        return {"dataset": SHAPES_DATASET_ID, "dataset_name": held_out_name(), "split": sliced}
    return {"dataset": str(data_path), "split": sliced}
