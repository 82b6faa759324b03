"""The training recipe behind `train.py` / `leanvlp-train`: Trainer, LoRA, resume, multi-process via accelerate.

Everything is `transformers.Trainer`: no home-made loop. With no arguments it trains a tiny MergeBridge on the
embedded shapes captions on a CPU in a few minutes and prints before/after caption quality on held-out images.
`--family patch_align` trains PatchAlign (tasks pretrain, retrieval, caption, vqa) the same way.

    python train.py                                   # tiny CPU demo (the defaults below)
    python train.py --config configs/tiny_patch_align.yaml
    python train.py --config configs/merge_bridge_pretrain.yaml --max_steps 1000
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config ...

A YAML `--config` supplies defaults; flags given on the command line override its keys.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import yaml
from datasets import Dataset, IterableDataset
from datasets import Image as ImageFeature
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging

from .checkpoints import CheckpointCompleteMarker, resolve_resume

logger = logging.get_logger("leanvlp.training")

FAMILIES = ("merge_bridge", "patch_align")
TASKS = ("caption", "vqa", "pretrain", "retrieval")
DATASETS = ("shapes", "coco", "hf")
HEADS = ("object_class", "attribute", "region_feature")
ANNOTATIONS = ("boxes", "box_labels", "box_attributes", "box_features")


# ----------------------------------------------------------------------------- arguments


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
    dataset: str = field(default="shapes", metadata={"help": f"one of {DATASETS}"})
    task: str = field(default="caption", metadata={"help": f"one of {TASKS}"})
    data_path: str | None = field(default=None, metadata={"help": "COCO-format folder, or datasets path / hub id"})
    train_split: str = "train"
    eval_split: str | None = None
    image_column: str = "image"
    caption_column: str | None = None
    num_train_images: int = 2000
    num_eval_images: int = 100
    streaming: bool = False
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip and count corrupt samples"})
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


# ----------------------------------------------------------------------------- data


def load_schema_data(args: DataArguments, image_size: int) -> tuple[Dataset | IterableDataset, Dataset | None]:
    """Train and eval sets in leanvlp's row schema (see `leanvlp.data.schema`)."""
    from .data import load_coco_folder, load_hf_dataset, make_shapes_splits

    if args.dataset == "shapes":
        splits = make_shapes_splits({"train": args.num_train_images, "eval": args.num_eval_images},
                                    image_size=max(image_size, 32))
        return splits["train"], splits["eval"]
    if args.data_path is None:
        raise ValueError(f"--dataset {args.dataset}: --data_path is required")
    if args.dataset == "coco":
        train = load_coco_folder(args.data_path, split=args.train_split, skip_bad=args.skip_bad_samples)
        evals = load_coco_folder(args.data_path, split=args.eval_split) if args.eval_split else None
        return train, evals
    mapping = {"image_column": args.image_column, "caption_column": args.caption_column}
    train = load_hf_dataset(args.data_path, split=args.train_split, streaming=args.streaming, **mapping)
    evals = load_hf_dataset(args.data_path, split=args.eval_split, **mapping) if args.eval_split else None
    return train, evals


def to_pairs(data: Dataset | IterableDataset, task: str, annotations: bool = False) -> Dataset | IterableDataset:
    """One row per (image, text) training pair: a caption, or a question with its most common answer.

    Images stay encoded (bytes) until the collator decodes them, so a corrupt image is reported with its id.
    `annotations=True` copies the image's boxes, box labels, attributes and teacher features onto each of its rows
    (PatchAlign's patch-level targets).
    """
    columns = set(data.column_names or [])
    needed = {"caption": ("image", "captions"), "vqa": ("image", "questions", "answers")}.get(task, ("image", "captions"))
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"dataset is missing column(s) {missing} needed for task {task!r}; it has {sorted(columns)}")
    if isinstance(data, Dataset) and len(data) == 0:
        raise ValueError("dataset is empty: no rows to train on")
    data = data.cast_column("image", ImageFeature(decode=False))
    carried = [c for c in ANNOTATIONS if annotations and c in columns]

    def flatten(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "image_id": [], "question": [], "target": [], "references": [],
                                **{c: [] for c in carried}}
        for i, image in enumerate(batch["image"]):
            image_id = str(batch["image_id"][i]) if "image_id" in batch else str(i)
            if task == "vqa":
                items = [(q, _majority(a), list(a)) for q, a in zip(batch["questions"][i], batch["answers"][i])]
            else:
                items = [("", c, list(batch["captions"][i])) for c in batch["captions"][i]]
            for question, target, refs in items:
                out["image"].append(image)
                out["image_id"].append(image_id)
                out["question"].append(question)
                out["target"].append(target)
                out["references"].append(refs)
                for c in carried:
                    out[c].append(batch[c][i])
        return out

    pairs = data.map(flatten, batched=True, remove_columns=list(data.column_names))
    if isinstance(pairs, Dataset) and len(pairs) == 0:  # e.g. --task vqa on rows whose `questions` are all empty
        fields = "'questions' / 'answers' are" if task == "vqa" else "'captions' is"
        raise ValueError(f"to_pairs: {fields} empty in every one of the {len(data)} rows, so task {task!r} has "
                         "no pairs")
    return pairs


def _majority(answers: Sequence[str]) -> str:
    values, counts = np.unique(np.asarray(answers, dtype=object).astype(str), return_counts=True)
    return str(values[int(np.argmax(counts))])


def decode_image(image: Any, image_id: str) -> PIL.Image.Image:
    """An RGB PIL image from a `datasets.Image(decode=False)` value; a clear error names the sample."""
    try:
        if isinstance(image, PIL.Image.Image):
            return image.convert("RGB")
        if image.get("bytes") is not None:
            pil = PIL.Image.open(io.BytesIO(image["bytes"]))
        else:
            pil = PIL.Image.open(image["path"])
        pil.load()
        return pil.convert("RGB")
    except Exception as err:  # PIL raises several types for corrupt data
        where = image.get("path") if isinstance(image, dict) else None
        raise ValueError(f"corrupt or unreadable image in sample {image_id!r} ({where or 'embedded bytes'}): {err}") from err


class ImageCollator:
    """Decodes each row's image; a corrupt one fails naming the sample, or is skipped and counted."""

    def __init__(self, processor: Any, task: str, skip_bad_samples: bool = False) -> None:
        self.processor, self.task, self.skip_bad_samples = processor, task, skip_bad_samples
        self.skipped: list[str] = []

    def images_and_rows(self, rows: list[dict[str, Any]]) -> tuple[list[PIL.Image.Image], list[dict[str, Any]]]:
        images, kept = [], []
        for row in rows:
            try:
                images.append(decode_image(row["image"], row["image_id"]))
                kept.append(row)
            except ValueError as err:
                if not self.skip_bad_samples:
                    raise ValueError(f"{err} (use --skip_bad_samples to skip and count such samples)") from err
                self.skipped.append(row["image_id"])
                logger.warning(f"skipping sample {row['image_id']!r}: {err}")
        if not kept:
            raise ValueError(f"every sample of a batch was unreadable: {[r['image_id'] for r in rows]}")
        return images, kept


class MergeBridgeCollator(ImageCollator):
    """Rows of `to_pairs` -> MergeBridge inputs via its processor (prompt template per task, labels on targets)."""

    def prompt(self, question: str) -> str:
        if self.task == "vqa":
            return self.processor.build_prompt("vqa", question=question)
        return self.processor.build_prompt("caption")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images, rows = self.images_and_rows(rows)
        return dict(self.processor(images=images, text=[self.prompt(r["question"]) for r in rows],
                                   targets=[r["target"] for r in rows]))


def sample_seed(image_id: str, text: str, epoch: int, seed: int) -> int:
    """A 63-bit seed that depends only on the sample, the epoch and the run's seed (never on the process)."""
    digest = hashlib.blake2b(f"{seed}|{epoch}|{image_id}|{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class PatchAlignCollator(ImageCollator):
    """Rows of `to_pairs(..., annotations=True)` -> PatchAlign inputs via `PatchAlignProcessor`.

    pretrain / retrieval: image + caption (+ boxes, labels, attributes, teacher features for the patch-level
    targets when `boxes=True`; samples without boxes are masked out of those losses) and `sample_seeds` that
    fix each sample's MLM mask (see `mask_tokens`). caption: decoder tokens with labels (padding -100). vqa: the
    question as `question_input_ids`, the answer as decoder tokens with labels. `epoch` is kept current by
    `CollatorEpoch`, so a sample is masked differently in each epoch.
    """

    def __init__(self, processor: Any, task: str, skip_bad_samples: bool = False, boxes: bool = False,
                 region_features: bool = False, seed: int = 0) -> None:
        super().__init__(processor, task, skip_bad_samples)
        self.boxes, self.region_features, self.seed, self.epoch = boxes, region_features, seed, 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images, rows = self.images_and_rows(rows)
        proc, targets = self.processor, [r["target"] for r in rows]
        if self.task == "vqa":
            question = proc.tokenizer([r["question"] for r in rows], padding=True, truncation=True,
                                      max_length=proc.max_length, return_tensors="pt")
            batch = dict(proc(images=images, text=targets))
            batch.update(question_input_ids=question["input_ids"], question_attention_mask=question["attention_mask"])
        elif self.task == "caption":
            batch = dict(proc(images=images, text=targets))
        else:
            annotations: dict[str, Any] = {}
            if self.boxes and any(r.get("boxes") for r in rows):
                annotations = {"boxes": [r.get("boxes") or [] for r in rows],
                               "box_labels": [r.get("box_labels") or [] for r in rows]}
                if proc.attributes:
                    annotations["box_attributes"] = [r.get("box_attributes") or [] for r in rows]
                if self.region_features:
                    annotations["box_features"] = [r.get("box_features") or [] for r in rows]
            batch = dict(proc(images=images, text=targets, **annotations))
            batch["sample_seeds"] = torch.tensor([sample_seed(r["image_id"], r["target"], self.epoch, self.seed)
                                                  for r in rows], dtype=torch.long)
            return batch
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (B, T)
        return batch


class CollatorEpoch(TrainerCallback):
    """Tells a collator the epoch that starts (before its first batch is collated)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.collator.epoch = int(state.epoch or 0)


# ----------------------------------------------------------------------------- models


def build_merge_bridge(args: ModelArguments, corpus: Sequence[str]) -> tuple[Any, Any]:
    """A MergeBridge model and processor: from a checkpoint, from pretrained towers, or tiny from scratch."""
    from . import MergeBridgeConfig, MergeBridgeForConditionalGeneration, MergeBridgeProcessor
    from .tiny import build_word_tokenizer, tiny_image_processor, tiny_llama_config, tiny_vision_config

    if args.checkpoint is not None:
        model = MergeBridgeForConditionalGeneration.from_pretrained(args.checkpoint)
        processor = MergeBridgeProcessor.from_pretrained(args.checkpoint)
        model.config.freeze_vision, model.config.freeze_llm = args.freeze_vision, args.freeze_llm
        model.apply_freezing()
        return model, processor
    merging = {"r": parse_r(args.bridge_r), "mode": args.bridge_mode, "prop_attn": args.bridge_prop_attn}
    common = dict(bridge_merging=merging, vision_merging={"r": args.vision_r},
                  freeze_vision=args.freeze_vision, freeze_llm=args.freeze_llm)
    if args.vision_model or args.text_model:
        if not (args.vision_model and args.text_model):
            raise ValueError("--vision_model and --text_model go together (both pretrained towers)")
        if args.bridge_init is None:
            common["bridge_config"] = dict(hidden_size=args.bridge_hidden, num_hidden_layers=args.bridge_layers,
                                           num_attention_heads=max(1, args.bridge_hidden // 64),
                                           intermediate_size=4 * args.bridge_hidden)
        model = MergeBridgeForConditionalGeneration.from_vision_text_pretrained(
            args.vision_model, args.text_model, bridge_init=args.bridge_init, **common)
        processor = MergeBridgeProcessor.from_vision_text_pretrained(args.vision_model, args.text_model,
                                                                     config=model.config)
        return model, processor
    tokenizer = build_word_tokenizer(corpus)
    config = MergeBridgeConfig(
        vision_config=tiny_vision_config(args.tiny_image_size, args.tiny_patch_size, args.tiny_vision_hidden,
                                         args.tiny_vision_layers).to_dict(),
        text_config=tiny_llama_config(len(tokenizer), args.tiny_llm_hidden, args.tiny_llm_layers).to_dict(),
        bridge_config=dict(hidden_size=args.bridge_hidden, num_hidden_layers=args.bridge_layers,
                           num_attention_heads=max(1, args.bridge_hidden // 64), intermediate_size=4 * args.bridge_hidden),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **common)
    model = MergeBridgeForConditionalGeneration(config)
    processor = MergeBridgeProcessor(tiny_image_processor(args.tiny_image_size), tokenizer,
                                     num_image_tokens=config.num_image_tokens,
                                     max_length=config.text_config.max_position_embeddings)
    return model, processor


@dataclass
class AnnotationVocab:
    """What the data's boxes name: object classes, attributes, the teacher feature size (0: none)."""

    object_classes: list[str]
    attributes: list[str]
    teacher_size: int

    @property
    def has_boxes(self) -> bool:
        return bool(self.object_classes)


def annotation_vocab(data: Dataset | IterableDataset, limit: int = 20000) -> AnnotationVocab:
    """Class and attribute vocabularies (sorted) and the teacher feature size, from the first `limit` images."""
    columns = [c for c in ("box_labels", "box_attributes", "box_features") if c in (data.column_names or [])]
    classes: set[str] = set()
    attributes: set[str] = set()
    teacher = 0
    if columns:
        for i, row in enumerate(data.select_columns(columns)):
            if i >= limit:
                break
            classes.update(row.get("box_labels") or [])
            attributes.update(a for per_box in row.get("box_attributes") or [] for a in per_box)
            teacher = teacher or len((row.get("box_features") or [[]])[0])
    return AnnotationVocab(sorted(classes), sorted(attributes), teacher)


def plural_synonyms(classes: Sequence[str]) -> dict[str, list[str]]:
    """English plurals ('-s', '-es') of each class name: a caption saying "two circles" mentions "circle"."""
    return {c: [c + "s", c + "es"] for c in classes}


def patch_align_kwargs(args: ModelArguments, task: str, vocab: AnnotationVocab, depth: int) -> dict[str, Any]:
    """PatchAlignConfig keywords from the flags, the task and what the data annotates."""
    heads = parse_heads(args.semantic_heads) if task == "pretrain" else []
    if "object_class" in heads and not vocab.object_classes:
        raise ValueError("--semantic_heads object_class needs boxes with box_labels in the data; it has none "
                         "(pass --semantic_heads '' to train without it)")
    if "attribute" in heads and not vocab.attributes:
        raise ValueError("--semantic_heads attribute needs box_attributes in the data; it has none")
    if "region_feature" in heads and not vocab.teacher_size:
        raise ValueError("--semantic_heads region_feature needs teacher features (box_features) in the data; it "
                         "has none")
    layer = args.detector_layer or max(1, depth // 2)
    weights = {"pretrain": {}, "retrieval": {"mlm": 0.0, "lm": 0.0, "pta": 0.0}}.get(task, {})  # LM then skipped
    return dict(
        patch_detector=dict(layer=layer, keep_ratio=args.keep_ratio),
        semantic_heads={h: dict(enabled=h in heads) for h in HEADS},
        object_classes=vocab.object_classes, attributes=vocab.attributes,
        teacher_size=vocab.teacher_size if "region_feature" in heads else 0,
        loss_weights=weights, num_fusion_layers=args.fusion_layers, num_decoder_layers=args.decoder_layers,
        embed_dim=args.embed_dim,
    )


def patch_align_class(task: str) -> type:
    """The PatchAlign head a task trains: all objectives (pretrain, retrieval), the caption or answer decoder."""
    from . import PatchAlignForConditionalGeneration, PatchAlignForPreTraining, PatchAlignForQuestionAnswering

    return {"pretrain": PatchAlignForPreTraining, "retrieval": PatchAlignForPreTraining,
            "caption": PatchAlignForConditionalGeneration, "vqa": PatchAlignForQuestionAnswering}[task]


def build_patch_align(args: ModelArguments, task: str, corpus: Sequence[str], vocab: AnnotationVocab) -> tuple[Any, Any]:
    """A PatchAlign model (the task's head) and processor: from a checkpoint, pretrained towers, or tiny from scratch.

    Tiny from scratch: a tiny ViT and a tiny BERT text encoder (dropout 0: tiny models on small data, and a run
    then does not depend on how many processes draw its dropout masks) over a word tokenizer of the corpus.
    """
    from . import PatchAlignConfig, PatchAlignProcessor
    from .tiny import build_bert_word_tokenizer, tiny_image_processor, tiny_vision_config

    model_class = patch_align_class(task)
    if args.checkpoint is not None:
        model = model_class.from_pretrained(args.checkpoint)
        processor = PatchAlignProcessor.from_pretrained(args.checkpoint)
        if task == "retrieval":  # fine-tune ITC + ITM only
            model.config.loss_weights.update(mlm=0.0, lm=0.0, pta=0.0)
    elif args.vision_model or args.text_model:
        if not (args.vision_model and args.text_model):
            raise ValueError("--vision_model and --text_model go together (both pretrained towers)")
        from transformers import AutoConfig

        vision_config = AutoConfig.from_pretrained(args.vision_model)
        depth = getattr(vision_config, "vision_config", vision_config).num_hidden_layers
        model = model_class.from_vision_text_pretrained(args.vision_model, args.text_model,
                                                        **patch_align_kwargs(args, task, vocab, depth))
        processor = PatchAlignProcessor.from_vision_text_pretrained(
            args.vision_model, args.text_model, config=model.config, synonyms=plural_synonyms(vocab.object_classes))
    else:
        tokenizer = build_bert_word_tokenizer(corpus)
        hidden = args.tiny_llm_hidden
        config = PatchAlignConfig(
            vision_config=tiny_vision_config(args.tiny_image_size, args.tiny_patch_size, args.tiny_vision_hidden,
                                             args.tiny_vision_layers).to_dict(),
            text_config=dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=hidden,
                             num_hidden_layers=args.tiny_llm_layers, num_attention_heads=max(1, hidden // 32),
                             intermediate_size=4 * hidden, max_position_embeddings=64, pad_token_id=0,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
            mask_token_id=tokenizer.mask_token_id,
            **patch_align_kwargs(args, task, vocab, args.tiny_vision_layers))
        model = model_class(config)
        processor = PatchAlignProcessor(tiny_image_processor(args.tiny_image_size), tokenizer,
                                        patch_size=args.tiny_patch_size, object_classes=vocab.object_classes,
                                        attributes=vocab.attributes, synonyms=plural_synonyms(vocab.object_classes),
                                        max_length=64)
    # Every head's remote-code entry (not only the saved class's), so the card's AutoModelForImageTextToText
    # snippet loads a pretraining checkpoint without leanvlp installed; save_pretrained keeps existing entries.
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}),
                             "AutoModel": "modeling_patch_align.PatchAlignModel",
                             "AutoModelForPreTraining": "modeling_patch_align.PatchAlignForPreTraining",
                             "AutoModelForImageTextToText": "modeling_patch_align.PatchAlignForConditionalGeneration"}
    backbone = model.patch_align
    for module, frozen in ((backbone.vision_tower, args.freeze_vision), (backbone.text_model, args.freeze_llm)):
        for param in module.parameters():
            param.requires_grad_(not frozen)
    return model, processor


def apply_lora(model: Any, args: ModelArguments) -> Any:
    """LoRA adapters on the LLM (regex `--lora_target`); the bridge trains fully (`modules_to_save`)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target,
                        modules_to_save=["bridge"])
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------- trainer


def is_loss_term(key: str) -> bool:
    """A loss term among a model's outputs: `*_loss` or `loss_*` (PatchAlign), not the total `loss`."""
    return key != "loss" and key != "train_loss" and (key.endswith("_loss") or key.startswith("loss_"))


class LeanTrainer(Trainer):
    """Trainer that also logs every loss term a model returns (`*_loss` / `loss_*` output fields), averaged over
    the micro-batches of each logging window and over processes, beside Trainer's own `loss`. With ITC logits
    (`logits_per_image`, (B, B_all)) it logs `itc_columns`: how many texts each image was contrasted with, which
    is the global batch when the negatives are gathered from every process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts: dict[str, list[float]] = defaultdict(list)
        self.add_callback(CheckpointCompleteMarker())

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """As Trainer's, but resumes only from a complete checkpoint ("latest": the newest complete one)."""
        return super().train(resume_from_checkpoint=resolve_resume(resume_from_checkpoint, self.args.output_dir),
                             **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("the model returned no loss: the batch has no labels / targets")
        for key, value in outputs.items():
            if is_loss_term(key) and value is not None:
                self._parts[key].append(float(value.detach()))
        if outputs.get("logits_per_image") is not None:
            self._parts["itc_columns"].append(float(outputs["logits_per_image"].shape[1]))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._parts and "loss" in logs:
            names = sorted(self._parts)
            local = torch.tensor([[sum(self._parts[n]), len(self._parts[n])] for n in names],
                                 device=self.accelerator.device, dtype=torch.float64)
            total = self.accelerator.reduce(local, reduction="sum")
            for name, (value, count) in zip(names, total.tolist()):
                logs[name] = round(value / max(count, 1.0), 6)
            self._parts.clear()
        super().log(logs, *args, **kwargs)


# ----------------------------------------------------------------------------- evaluation, reporting


def save_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """A PNG of every logged loss term against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for entry in log_history:
        for key, value in entry.items():
            if (key == "loss" or is_loss_term(key)) and "step" in entry and isinstance(value, (int, float)):
                series[key][0].append(entry["step"])
                series[key][1].append(value)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def corpus_of(data: Dataset | IterableDataset, limit: int = 20000) -> list[str]:
    """Captions, questions and answers: the vocabulary of a tokenizer built from scratch."""
    texts: list[str] = []
    for i, row in enumerate(data.select_columns([c for c in ("captions", "questions", "answers") if c in data.column_names])):
        if i >= limit:
            break
        texts += list(row.get("captions") or []) + list(row.get("questions") or [])
        texts += [a for answers in row.get("answers") or [] for a in answers]
    return texts + ["question", ":", "short", "answer"]


def main(argv: Sequence[str] | None = None) -> int:
    from .evaluation import caption_report, eval_rows, patch_align_report  # evaluation builds on this module

    model_args, data_args, train_args = parse_args(argv)
    set_seed(train_args.seed)
    start = time.time()
    train_data, eval_data = load_schema_data(data_args, model_args.tiny_image_size)
    patch_align = model_args.family == "patch_align"
    if patch_align:
        vocab = annotation_vocab(train_data)
        model, processor = build_patch_align(model_args, data_args.task, corpus_of(train_data), vocab)
        pairs = to_pairs(train_data, data_args.task, annotations=True)
        heads = model.config.semantic_heads
        collator: ImageCollator = PatchAlignCollator(
            processor, data_args.task, data_args.skip_bad_samples, boxes=vocab.has_boxes and data_args.task == "pretrain",
            region_features=heads["region_feature"]["enabled"], seed=train_args.seed)

        def report(m: Any) -> dict | None:
            return patch_align_report(m, processor, eval_data, data_args.task, data_args.num_eval_images,
                                      data_args.max_new_tokens)
    else:
        model, processor = build_merge_bridge(model_args, corpus_of(train_data))
        pairs = to_pairs(train_data, data_args.task)
        rows = eval_rows(eval_data, data_args.task, data_args.num_eval_images)
        collator = MergeBridgeCollator(processor, data_args.task, data_args.skip_bad_samples)

        def report(m: Any) -> dict | None:
            return caption_report(m, processor, rows, data_args.task, data_args.max_new_tokens) if rows else None
    before = report(model)
    if model_args.lora_r > 0:
        model = apply_lora(model, model_args)
    push, train_args.push_to_hub = train_args.push_to_hub, False  # pushed after everything is saved locally
    trainer = LeanTrainer(model=model, args=train_args, train_dataset=pairs, data_collator=collator,
                          processing_class=processor, callbacks=[CollatorEpoch(collator)] if patch_align else None)
    result = trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
    out = Path(train_args.output_dir)
    final = model
    if model_args.lora_r > 0:
        trainer.save_model(str(out / "adapter"))  # the LoRA adapter + bridge, loadable with peft
        final = model.merge_and_unload()  # the folder itself holds the merged, standalone model
    else:
        trainer.save_model(str(out))  # model + processor, gathered correctly under DDP / FSDP / DeepSpeed
    after = report(final)
    if trainer.is_world_process_zero():
        _finish(trainer, final, processor, out, model_args, data_args, result, before, after, collator, start, push)
    return 0


def visual_tokens(model: Any) -> dict[str, Any]:
    """Visual tokens per image as the config predicts them, for the summary and the end-of-run line."""
    config = model.config
    if config.model_type == "patch_align":
        det = config.patch_detector
        kept = config.num_kept_patches
        out = 1 + kept + (1 if kept < config.num_patches else 0)  # CLS + kept + the fused token
        return {"visual_tokens": out, "line": f"{1 + config.num_patches} -> {out} (patch detector after block "
                f"{det['layer']}, keep ratio {det['keep_ratio']})", "patch_detector": det}
    return {"visual_tokens": config.num_image_tokens, "bridge_merging": config.bridge_merging,
            "line": f"{config.num_vision_tokens} -> {config.num_image_tokens} (bridge merging {config.bridge_merging})"}


def _finish(trainer: Trainer, model: Any, processor: Any, out: Path, model_args: ModelArguments,
            data_args: DataArguments, result: Any, before: dict | None, after: dict | None,
            collator: ImageCollator, start: float, push: bool) -> None:
    from .model_card import push_to_hub, write_model_card

    if model_args.lora_r > 0:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    curve = save_loss_curve(trainer.state.log_history, out / "loss_curve.png")
    dataset_id = {"shapes": "leanvlp/shapes"}.get(data_args.dataset, data_args.data_path or data_args.dataset)
    results = []
    report_task = "retrieval" if data_args.task == "pretrain" else data_args.task  # pretraining reports retrieval
    if after is not None:
        metrics = {k: v for k, v in after.items() if isinstance(v, float) and k != "images"}
        results.append({"task": report_task, "dataset": dataset_id, "split": "held-out", "metrics": metrics})
        (out / "eval_results.json").write_text(json.dumps({"results": results}, indent=2))
    tokens = visual_tokens(model)
    summary = {
        "family": model_args.family, "task": data_args.task, "dataset": dataset_id,
        "steps": trainer.state.global_step, "train_loss": round(result.training_loss, 4),
        "wall_clock_s": round(time.time() - start, 1),
        **{k: v for k, v in tokens.items() if k != "line"}, "skipped_samples": len(collator.skipped),
        "base_models": [m for m in (model_args.vision_model, model_args.text_model) if m],
        "datasets": [dataset_id],
        "world_size": trainer.args.world_size,
        "losses": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        "logged": {h["step"]: {k: v for k, v in h.items() if k == "itc_columns" or is_loss_term(k)}
                   for h in trainer.state.log_history if "loss" in h},
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_model_card(out, family=model_args.family, base_models=summary["base_models"], datasets=[dataset_id],
                     training_summary=summary)
    print("\n" + "=" * 72)
    print(f"leanvlp: trained {model_args.family} for {summary['steps']} steps in {summary['wall_clock_s']} s; "
          f"final train loss {summary['train_loss']}")
    print(f"visual tokens per image: {tokens['line']}")
    if before is not None and after is not None:
        keys = [k for k in ("cider", "bleu_4", "rouge_l", "vqa_accuracy", "token_accuracy", "i2t_r1", "t2i_r1",
                            "r_mean", "pta_precision") if k in after]
        print(f"held-out ({after['images']} images)   "
              + "   ".join(f"{k}: {before[k]:.3f} -> {after[k]:.3f}" for k in keys))
        if "example" in after:
            print(f"example caption before: {before['example']!r}")
            print(f"example caption after:  {after['example']!r}")
    if collator.skipped:
        print(f"skipped {len(collator.skipped)} unreadable samples: {collator.skipped[:10]}")
    print(f"checkpoint: {out.resolve()}" + (f"   loss curve: {curve}" if curve else ""))
    print("=" * 72)
    if push:
        try:
            push_to_hub(out, trainer.args.hub_model_id or out.name, token=trainer.args.hub_token)
        except Exception as err:
            print(f"push_to_hub failed: {err} (everything is saved locally in {out})", file=sys.stderr)
            raise SystemExit(1) from None


if __name__ == "__main__":
    raise SystemExit(main())
