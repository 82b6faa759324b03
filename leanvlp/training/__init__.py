"""The training recipe behind `train.py` / `leanvlp-train`: Trainer, LoRA, resume, multi-process via accelerate.

Everything is `transformers.Trainer`: no home-made loop. With no arguments it trains a tiny MergeBridge on the
embedded shapes captions on a CPU in a few minutes and prints before/after caption quality on held-out images.
`--family patch_align` trains PatchAlign (tasks pretrain, retrieval, caption, vqa) the same way.

    python train.py                                   # tiny CPU demo (the defaults below)
    python train.py --config configs/tiny_patch_align.yaml
    python train.py --config configs/merge_bridge_pretrain.yaml --max_steps 1000
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config ...

A YAML `--config` supplies defaults; flags given on the command line override its keys.

Modules, in the order a run uses them (the data they read is in `leanvlp.data`: pairs, collators):

    arguments  ModelArguments, DataArguments, LeanTrainingArguments and parse_args (YAML + flags)
    models     model and processor per family (checkpoint, pretrained towers or tiny), LoRA
    trainer    LeanTrainer (every loss term logged), CollatorEpoch, the loss curve
    cli        load the data, build, train, save, card, before/after numbers (via leanvlp.evaluation)
"""

from .arguments import DataArguments, LeanTrainingArguments, ModelArguments, parse_args, parse_heads, parse_r
from .cli import load_schema_data, main
from .models import AnnotationVocab, annotation_vocab, apply_lora, build_merge_bridge, build_patch_align, corpus_of
from .trainer import CollatorEpoch, LeanTrainer, is_loss_term, save_loss_curve

__all__ = [
    "AnnotationVocab",
    "CollatorEpoch",
    "DataArguments",
    "LeanTrainer",
    "LeanTrainingArguments",
    "ModelArguments",
    "annotation_vocab",
    "apply_lora",
    "build_merge_bridge",
    "build_patch_align",
    "corpus_of",
    "is_loss_term",
    "load_schema_data",
    "main",
    "parse_args",
    "parse_heads",
    "parse_r",
    "save_loss_curve",
]
