"""train.py's flags: model, data and Trainer arguments, from a YAML `--config` and the command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments


FAMILIES = ("merge_bridge", "patch_align")
TASKS = ("caption", "vqa", "pretrain", "retrieval")
DATASETS = ("shapes", "coco", "hf", "webdataset")
HEADS = ("object_class", "attribute", "region_feature")


@dataclass
class ModelArguments:
    """Which model, from where. Without `--vision_model/--text_model/--checkpoint`, tiny towers are built
    from scratch with the `tiny_*` sizes (the embedded default: no downloads)."""

    family: str = field(default="merge_bridge", metadata={"help": f"one of {FAMILIES}"})
    checkpoint: str | None = field(default=None, metadata={"help": "a leanvlp checkpoint to fine-tune"})
    vision_model: str | None = field(default=None, metadata={"help": "pretrained vision tower (dir or hub id)"})
    text_model: str | None = field(default=None, metadata={"help": "pretrained LLM / text encoder (dir or hub id)"})
    bridge_init: str | None = field(default=None, metadata={"help": "BERT checkpoint initialising the bridge"})
    bridge_r: str = field(default="16", metadata={"help": "bridge merges per layer: '19', '16,-1' or '8,8,4'"})
    bridge_mode: str = field(default="mean", metadata={"help": "'mean' (EVLGen) or 'size_weighted' (ToMe)"})
    bridge_prop_attn: bool = False
    bridge_layers: int = 2
    bridge_hidden: int = 128
    bridge_dropout: float = field(default=0.1, metadata={
        "help": "dropout in the bridge's BERT layers (hidden and attention; BERT's 0.1) when the bridge is new"})
    vision_r: int = field(default=0, metadata={"help": "token merging inside the vision tower"})
    freeze_vision: bool | None = field(default=None, metadata={
        "help": "freeze the vision tower (default: True for MergeBridge, False for PatchAlign, trained end to end)"})
    freeze_llm: bool = field(default=False, metadata={
        "help": "freeze the LLM (PatchAlign: the BERT text encoder); the tiny demo trains its random LLM"})
    tiny_image_size: int = 64
    tiny_patch_size: int = 8
    tiny_vision_hidden: int = 64
    tiny_vision_layers: int = 2
    tiny_llm_hidden: int = field(default=128, metadata={"help": "tiny LLM (PatchAlign: BERT text encoder) width"})
    tiny_llm_layers: int = 2
    keep_ratio: float = field(default=0.5, metadata={"help": "PatchAlign: share of patches the detector keeps"})
    detector_layer: int = field(default=0, metadata={
        "help": "PatchAlign: prune after this vision block (1-based); 0 = half the tower's depth"})
    semantic_heads: str = field(default="object_class,attribute", metadata={
        "help": "PatchAlign pretrain: comma-separated heads among object_class, attribute, region_feature "
                "(region_feature needs box_features in the data); '' for none"})
    fusion_layers: int = field(default=2, metadata={"help": "PatchAlign: fusion (cross-attention) layers"})
    decoder_layers: int = field(default=2, metadata={"help": "PatchAlign: caption / answer decoder layers"})
    embed_dim: int = field(default=128, metadata={"help": "PatchAlign: ITC embedding size"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LLM (0: no LoRA)"})
    lora_alpha: int = 16
    lora_target: str = r".*language_model.*\.(q_proj|v_proj)"


@dataclass
class DataArguments:
    """Which data, for which task: the embedded shapes set, a COCO folder or any `datasets` source."""

    dataset: str = field(default="shapes", metadata={"help": f"one of {DATASETS}"})
    task: str = field(default="caption", metadata={"help": f"one of {TASKS}"})
    data_path: str | None = field(default=None, metadata={
        "help": "COCO-format folder, datasets path / hub id, or tar shards ('DIR/{00000..00009}.tar', a glob)"})
    train_split: str = "train"
    eval_split: str | None = None
    image_column: str = "image"
    caption_column: str | None = None
    num_train_images: int = 2000
    num_eval_images: int = 100
    streaming: bool = False
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip and count corrupt samples"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "webdataset: samples in each reader's shuffle buffer"})
    max_new_tokens: int = 20


@dataclass
class LeanTrainingArguments(TrainingArguments):
    """TrainingArguments with the tiny CPU demo's defaults."""

    output_dir: str = "outputs/tiny-merge-bridge"
    per_device_train_batch_size: int = 32
    num_train_epochs: float = 3.0
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: float = 0.05
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "see transformers.SchedulerType"})
    logging_steps: int = 25
    save_strategy: str = "steps"
    save_steps: int = 200
    save_total_limit: int = 2
    remove_unused_columns: bool = False
    dataloader_drop_last: bool = True
    seed: int = 0


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, LeanTrainingArguments]:
    """Dataclasses from `--config file.yaml` (defaults) and command-line flags (which win)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        path = Path(argv[i + 1])
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file {str(path)!r}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(loaded).__name__}")
        argv = _yaml_to_argv(loaded) + argv[:i] + argv[i + 2:]
    if not any(flag in argv for flag in ("--bf16", "--fp16")) and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        argv += ["--bf16", "true"]  # bf16 where available, unless the user chose a precision
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv += ["--use_cpu", "true"]  # several processes without a GPU: accelerate then uses gloo on CPU
    parser = HfArgumentParser((ModelArguments, DataArguments, LeanTrainingArguments))
    model_args, data_args, train_args, extra = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if extra:
        raise ValueError(f"unknown arguments: {extra}")
    if model_args.family not in FAMILIES:
        raise ValueError(f"--family: unknown model family {model_args.family!r}; choose one of {FAMILIES}")
    if data_args.task not in TASKS:
        raise ValueError(f"--task: unknown task {data_args.task!r}; choose one of {TASKS}")
    if data_args.dataset not in DATASETS:
        raise ValueError(f"--dataset: unknown dataset kind {data_args.dataset!r}; choose one of {DATASETS}")
    if model_args.family == "merge_bridge" and data_args.task not in ("caption", "vqa"):
        raise ValueError(f"--task {data_args.task!r}: MergeBridge trains on 'caption' or 'vqa'")
    if data_args.dataset == "webdataset":
        if train_args.max_steps <= 0:
            raise ValueError("--dataset webdataset streams without end: give --max_steps")
        train_args.ignore_data_skip = True  # the stream resumes from its own saved position (WebDatasetStateCallback)
    if model_args.freeze_vision is None:
        model_args.freeze_vision = model_args.family == "merge_bridge"
    if model_args.family == "patch_align":
        if model_args.lora_r > 0:
            raise ValueError(f"--lora_r {model_args.lora_r}: LoRA targets MergeBridge's LLM; PatchAlign trains fully")
        if not 0.0 < model_args.keep_ratio <= 1.0:
            raise ValueError(f"--keep_ratio must be in (0, 1], got {model_args.keep_ratio}")
        unknown = set(parse_heads(model_args.semantic_heads)) - set(HEADS)
        if unknown:
            raise ValueError(f"--semantic_heads: unknown head(s) {sorted(unknown)}; choose among {HEADS}")
    return model_args, data_args, train_args


def parse_heads(text: str) -> list[str]:
    """'object_class, attribute' -> ['object_class', 'attribute']."""
    return [h.strip() for h in str(text).split(",") if h.strip()]


def _yaml_to_argv(config: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict):
            raise ValueError(f"--config: key {key!r} holds a mapping; use a flat mapping of flag names")
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v) for v in values)]
    return argv


def parse_r(text: str) -> int | tuple[int, int] | list[int]:
    """'19' -> 19, '16,-1' -> (16, -1), '8,8,4' -> [8, 8, 4]."""
    try:
        parts = [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError as err:
        raise ValueError(f"--bridge_r: expected integers like '19', '16,-1' or '8,8,4', got {text!r}") from err
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2 and parts[1] == -1:
        return (parts[0], -1)
    return parts
