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
from transformers import TrainingArguments

from ..cli_args import HelpGroup, LeanArgumentParser, UsageError
from ..data.shapes import HELD_OUT_START


FAMILIES = ("merge_bridge", "patch_align")
TASKS = ("caption", "vqa", "pretrain", "retrieval")
DATASETS = ("shapes", "coco", "hf", "webdataset")
HEADS = ("object_class", "attribute", "region_feature")
CAPTION_CHOICES = ("all", "consensus")


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
    bridge_prop_attn: bool = field(default=False, metadata={"help": "ToMe proportional attention in the bridge"})
    bridge_layers: int = field(default=2, metadata={"help": "bridge (BERT) layers when the bridge is new"})
    bridge_hidden: int = field(default=128, metadata={"help": "bridge width when the bridge is new"})
    bridge_dropout: float = field(default=0.1, metadata={
        "help": "dropout in the bridge's BERT layers (hidden and attention; BERT's 0.1) when the bridge is new"})
    vision_r: int = field(default=0, metadata={"help": "token merging inside the vision tower"})
    freeze_vision: bool | None = field(default=None, metadata={
        "help": "freeze the vision tower (default: frozen when MergeBridge starts from a pretrained tower or "
                "checkpoint; trained when the tower is built from scratch, and for PatchAlign)"})
    freeze_llm: bool = field(default=False, metadata={
        "help": "freeze the LLM (PatchAlign: the BERT text encoder); the tiny demo trains its random LLM"})
    tiny_vision_init: str | None = field(default=None, metadata={
        "help": "MergeBridge without --vision_model: 'shapes' starts from the embedded tiny ViT pretrained on shapes "
                "(frozen; its sizes fix the tiny ViT flags), 'random' builds the tiny ViT from the tiny_* sizes; "
                "default: shapes on the shapes dataset unless a tiny ViT size is given, random elsewhere"})
    tiny_image_size: int = field(default=64, metadata={"help": "tiny ViT: image side in pixels"})
    tiny_patch_size: int = field(default=8, metadata={"help": "tiny ViT: patch side in pixels"})
    tiny_vision_hidden: int = field(default=64, metadata={"help": "tiny ViT: width"})
    tiny_vision_layers: int = field(default=2, metadata={"help": "tiny ViT: layers"})
    tiny_llm_hidden: int = field(default=128, metadata={"help": "tiny LLM (PatchAlign: BERT text encoder) width"})
    tiny_llm_layers: int = field(default=2, metadata={"help": "tiny LLM (PatchAlign: BERT text encoder) layers"})
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
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha"})
    lora_target: str = field(default=r".*language_model.*\.(q_proj|v_proj)",
                             metadata={"help": "regex of the LLM modules LoRA adapts"})
    license: str | None = field(default=None, metadata={
        "help": "the model card's licence (a Hub licence id, e.g. apache-2.0); the base models' own are listed"})


@dataclass
class DataArguments:
    """Which data, for which task: the embedded shapes set, a COCO folder or any `datasets` source."""

    dataset: str = field(default="shapes", metadata={"help": f"one of {DATASETS}"})
    task: str = field(default="caption", metadata={"help": f"one of {TASKS}"})
    data_path: str | None = field(default=None, metadata={
        "help": "COCO-format folder, datasets path / hub id, or tar shards ('DIR/{00000..00009}.tar', a glob)"})
    train_split: str = field(default="train", metadata={"help": "coco / hf: the split to train on"})
    eval_split: str | None = field(default=None, metadata={
        "help": "coco / hf: the split scored before and after training (shapes: the held-out split)"})
    image_column: str = field(default="image", metadata={"help": "hf: the image column"})
    caption_column: str | None = field(default=None, metadata={"help": "hf: the caption column"})
    num_train_images: int = field(default=2000, metadata={"help": "shapes: training images"})
    num_eval_images: int = field(default=100, metadata={"help": "held-out images scored before and after training"})
    streaming: bool = field(default=False, metadata={"help": "hf: stream the training split (needs --max_steps)"})
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip and count corrupt samples"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "webdataset: samples in each reader's shuffle buffer"})
    max_new_tokens: int = field(default=20, metadata={"help": "longest generated caption / answer when scoring"})
    train_captions: str | None = field(default=None, metadata={
        "help": "caption task: train on 'all' of an image's captions, or on its 'consensus' caption only (the one "
                "sharing the most words with the others: one consistent target that greedy decoding reproduces); "
                "default: consensus on shapes, all elsewhere"})


@dataclass
class LeanTrainingArguments(TrainingArguments):
    """TrainingArguments with the tiny CPU demo's defaults."""

    output_dir: str = "outputs/tiny-merge-bridge"
    per_device_train_batch_size: int = 32
    num_train_epochs: float = 10.0
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: float = 0.05
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "see transformers.SchedulerType"})
    logging_steps: int = 25
    save_strategy: str = "steps"
    save_steps: int = 200
    save_total_limit: int = 2
    eval_strategy: str = field(default="steps", metadata={"help": "held-out loss every eval_steps (= logging_steps)"})
    per_device_eval_batch_size: int = 32
    prediction_loss_only: bool = True  # the held-out loss only; quality metrics come from the before/after reports
    remove_unused_columns: bool = False
    dataloader_drop_last: bool = True
    seed: int = 0


TRAINER_HELP = {  # the TrainingArguments flags the short help lists, with one-line help texts
    "output_dir": "where the model, processor, card, eval_results.json and loss curve go",
    "num_train_epochs": "passes over the training pairs",
    "max_steps": "stop after this many optimizer steps (overrides epochs; needed with --streaming)",
    "per_device_train_batch_size": "pairs per step and process",
    "learning_rate": "peak learning rate (AdamW)",
    "lr_scheduler_type": "learning-rate schedule after warm-up",
    "warmup_steps": "warm-up steps (a float < 1: that share of all steps)",
    "weight_decay": "AdamW weight decay",
    "logging_steps": "log the losses every N steps",
    "eval_steps": "score the held-out loss every N steps (default: logging_steps)",
    "save_steps": "save a checkpoint every N steps",
    "save_total_limit": "keep at most N checkpoints",
    "resume_from_checkpoint": "a checkpoint folder, or 'latest' (the newest complete one in --output_dir)",
    "seed": "random seed (data order, initialisation)",
    "disable_tqdm": "hide the progress bars",
    "push_to_hub": "upload the folder and card when training ends",
    "hub_model_id": "the Hub repo to push to (default: the output folder's name)",
    "report_to": "experiment trackers, e.g. none, tensorboard, wandb",
}
HINTS = {"lr": "learning_rate", "batch_size": "per_device_train_batch_size", "bs": "per_device_train_batch_size",
         "epochs": "num_train_epochs", "steps": "max_steps", "data": "dataset", "model": "checkpoint",
         "out": "output_dir", "output": "output_dir", "licence": "license"}
MODEL_FIELDS = ("family", "checkpoint", "vision_model", "text_model", "bridge_init", "bridge_r", "bridge_mode",
                "bridge_prop_attn", "bridge_layers", "bridge_hidden", "bridge_dropout", "vision_r", "freeze_vision",
                "freeze_llm", "license")
TINY_VISION_INITS = ("shapes", "random")
TINY_VISION_FIELDS = ("tiny_image_size", "tiny_patch_size", "tiny_vision_hidden", "tiny_vision_layers")
TINY_FIELDS = (*TINY_VISION_FIELDS, "tiny_llm_hidden", "tiny_llm_layers")
PATCH_ALIGN_FIELDS = ("keep_ratio", "detector_layer", "semantic_heads", "fusion_layers", "decoder_layers",
                      "embed_dim")
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_target")


def build_parser() -> LeanArgumentParser:
    """train.py's parser: short grouped `--help`, the full Trainer flags under `--help-all`."""
    parser = LeanArgumentParser(
        (ModelArguments, DataArguments, LeanTrainingArguments), prog="train.py", full_help=True, hints=HINTS,
        description="Train a leanvlp model (MergeBridge or PatchAlign) with transformers' Trainer. With no flags: "
                    "the README's main job (configs/tiny_cpu.yaml), a tiny MergeBridge captioning the embedded "
                    "shapes images on a CPU in a few minutes, scored on held-out images before and after.",
        examples=["python train.py",
                  "python train.py --config configs/tiny_vqa.yaml --num_train_epochs 1",
                  "python train.py --family patch_align --task pretrain --output_dir outputs/pa",
                  "python train.py --dataset coco --data_path data/coco --vision_model DIR --text_model DIR",
                  "python train.py --dataset webdataset --data_path 'shards/{00000..00009}.tar' --max_steps 300",
                  "python train.py --resume_from_checkpoint latest"],
        extra_lines=["config:", "  --config FILE.yaml".ljust(34) + "YAML mapping of flag names to values (e.g. "
                     "configs/tiny_vqa.yaml);", " " * 34 + "flags given on the command line override its keys"],
        groups=[HelpGroup("model", ModelArguments, MODEL_FIELDS),
                HelpGroup("tiny models built from scratch (no --checkpoint / --vision_model)", ModelArguments,
                          TINY_FIELDS),
                HelpGroup("PatchAlign (--family patch_align)", ModelArguments, PATCH_ALIGN_FIELDS),
                HelpGroup("LoRA (MergeBridge's LLM)", ModelArguments, LORA_FIELDS),
                HelpGroup("data", DataArguments),
                HelpGroup("training (transformers.TrainingArguments; defaults: the tiny CPU demo's)",
                          LeanTrainingArguments, tuple(TRAINER_HELP), TRAINER_HELP)])
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML mapping of flag names to values; flags on the command line override its keys")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, LeanTrainingArguments]:
    """Dataclasses from `--config file.yaml` (defaults) and command-line flags (which win). Bad input raises
    UsageError (one line); `--help` / `--help-all` print and exit 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UsageError("--config needs a YAML file path")
        path = Path(argv[i + 1])
        if not path.is_file():
            raise UsageError(f"--config: no such file {str(path)!r}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise UsageError(f"--config {path}: expected a mapping of flag names to values, got "
                             f"{type(loaded).__name__}")
        argv = _yaml_to_argv(loaded) + argv[:i] + argv[i + 2:]
    if not any(flag in argv for flag in ("--bf16", "--fp16")) and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        argv += ["--bf16", "true"]  # bf16 where available, unless the user chose a precision
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv += ["--use_cpu", "true"]  # several processes without a GPU: accelerate then uses gloo on CPU
    if not torch.cuda.is_available() and "--dataloader_pin_memory" not in argv:
        argv += ["--dataloader_pin_memory", "false"]  # pinning needs an accelerator; on CPU it only warns
    try:
        model_args, data_args, train_args = build_parser().parse(argv)
    except UsageError:
        raise
    except ValueError as err:  # TrainingArguments' own checks
        raise UsageError(str(err).strip().splitlines()[0]) from None
    check_args(model_args, data_args)
    if data_args.dataset == "webdataset":
        if train_args.max_steps <= 0:
            raise UsageError("--dataset webdataset streams without end: give --max_steps")
        train_args.ignore_data_skip = True  # the stream resumes from its own saved position (WebDatasetStateCallback)
    return model_args, data_args, train_args


def check_args(model_args: ModelArguments, data_args: DataArguments) -> None:
    """Values the dataclasses accept but a run cannot use: a UsageError naming the flag and the value."""
    if model_args.family not in FAMILIES:
        raise UsageError(f"--family: unknown model family {model_args.family!r}; choose one of {FAMILIES}")
    if data_args.task not in TASKS:
        raise UsageError(f"--task: unknown task {data_args.task!r}; choose one of {TASKS}")
    if data_args.dataset not in DATASETS:
        raise UsageError(f"--dataset: unknown dataset kind {data_args.dataset!r}; choose one of {DATASETS}")
    if data_args.train_captions not in (*CAPTION_CHOICES, None):
        raise UsageError(f"--train_captions: expected one of {CAPTION_CHOICES}, got {data_args.train_captions!r}")
    if data_args.dataset == "webdataset" and data_args.train_captions == "consensus":
        raise UsageError("--train_captions consensus needs a dataset it can map; --dataset webdataset streams "
                         "every caption of a sample (use 'all')")
    if data_args.dataset != "shapes" and data_args.data_path is None:
        raise UsageError(f"--dataset {data_args.dataset}: --data_path is required (a COCO folder, a datasets "
                         "path / Hub id or tar shards)")
    if model_args.family == "merge_bridge" and data_args.task not in ("caption", "vqa"):
        raise UsageError(f"--task {data_args.task!r}: MergeBridge trains on 'caption' or 'vqa'")
    if data_args.dataset == "shapes" and data_args.num_train_images > HELD_OUT_START:
        raise UsageError(f"--num_train_images {data_args.num_train_images}: shapes training images must stay below "
                         f"the held-out split, which starts at image {HELD_OUT_START:,}")
    for name in ("num_train_images", "max_new_tokens"):
        if getattr(data_args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(data_args, name)}")
    if data_args.num_eval_images < 0:
        raise UsageError(f"--num_eval_images must be >= 0, got {data_args.num_eval_images}")
    for name in ("bridge_layers", "bridge_hidden", *TINY_FIELDS):
        if getattr(model_args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(model_args, name)}")
    if not 0.0 <= model_args.bridge_dropout < 1.0:
        raise UsageError(f"--bridge_dropout must be in [0, 1), got {model_args.bridge_dropout}")
    try:
        parse_r(model_args.bridge_r)
    except ValueError as err:
        raise UsageError(str(err)) from None
    check_tiny_vision_init(model_args, data_args)
    if model_args.freeze_vision is None:  # a random tower learns nothing frozen
        pretrained = (model_args.vision_model is not None or model_args.checkpoint is not None
                      or model_args.tiny_vision_init == "shapes")
        model_args.freeze_vision = model_args.family == "merge_bridge" and pretrained
    if data_args.train_captions is None:  # shapes' captions are template variants of one scene description
        data_args.train_captions = "consensus" if data_args.dataset == "shapes" else "all"
    if model_args.family == "patch_align":
        if model_args.lora_r > 0:
            raise UsageError(f"--lora_r {model_args.lora_r}: LoRA targets MergeBridge's LLM; PatchAlign trains fully")
        if not 0.0 < model_args.keep_ratio <= 1.0:
            raise UsageError(f"--keep_ratio must be in (0, 1], got {model_args.keep_ratio}")
        unknown = set(parse_heads(model_args.semantic_heads)) - set(HEADS)
        if unknown:
            raise UsageError(f"--semantic_heads: unknown head(s) {sorted(unknown)}; choose among {HEADS}")


def check_tiny_vision_init(model_args: ModelArguments, data_args: DataArguments) -> None:
    """Resolve --tiny_vision_init; the embedded shapes tower has fixed sizes, so a changed tiny ViT size is refused."""
    init = model_args.tiny_vision_init
    if init not in (*TINY_VISION_INITS, None):
        raise UsageError(f"--tiny_vision_init: expected one of {TINY_VISION_INITS}, got {init!r}")
    tiny_tower = model_args.family == "merge_bridge" and model_args.vision_model is None and model_args.checkpoint is None
    defaults = ModelArguments()
    sized = [name for name in TINY_VISION_FIELDS if getattr(model_args, name) != getattr(defaults, name)]
    if init is None:  # a tiny ViT size given asks for a new tiny ViT
        init = "shapes" if tiny_tower and data_args.dataset == "shapes" and not sized else "random"
    elif init == "shapes" and not tiny_tower:
        raise UsageError("--tiny_vision_init shapes: the embedded shapes tower starts a MergeBridge built from scratch "
                         "(no --vision_model / --checkpoint, --family merge_bridge)")
    elif init == "shapes" and sized:
        raise UsageError(f"--{sized[0]} {getattr(model_args, sized[0])} with --tiny_vision_init shapes: the embedded "
                         "shapes tower has its own sizes; pass --tiny_vision_init random for a new tiny ViT")
    model_args.tiny_vision_init = init


def parse_heads(text: str) -> list[str]:
    """'object_class, attribute' -> ['object_class', 'attribute']."""
    return [h.strip() for h in str(text).split(",") if h.strip()]


def _yaml_to_argv(config: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict):
            raise UsageError(f"--config: key {key!r} holds a mapping; use a flat mapping of flag names")
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
