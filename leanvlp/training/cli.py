"""`train.py` / `leanvlp-train`: data -> model -> Trainer -> saved folder, card and before/after numbers."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import Trainer, set_seed

from ..data import make_shapes_splits
from ..data.collate import ImageCollator, MergeBridgeCollator, PatchAlignCollator
from ..data.pairs import eval_rows, load_split, to_pairs
from ..evaluation import caption_report, patch_align_report
from ..evaluation.generation import object_mentions
from ..cli_args import UsageError
from .arguments import DataArguments, ModelArguments, parse_args
from .models import annotation_vocab, apply_lora, build_merge_bridge, build_patch_align, corpus_of
from .trainer import CollatorEpoch, LeanTrainer, is_loss_term, save_loss_curve


def load_schema_data(args: DataArguments, image_size: int) -> tuple[Dataset | IterableDataset, Dataset | None]:
    """Train and eval sets in leanvlp's row schema (see `leanvlp.data.schema`)."""
    if args.dataset == "shapes":
        splits = make_shapes_splits({"train": args.num_train_images, "eval": args.num_eval_images},
                                    image_size=max(image_size, 32))
        return splits["train"], splits["eval"]
    if args.data_path is None:
        raise UsageError(f"--dataset {args.dataset}: --data_path is required")
    columns = {"image_column": args.image_column, "caption_column": args.caption_column}
    train = load_split(args.dataset, args.data_path, args.train_split, streaming=args.streaming,
                       skip_bad=args.skip_bad_samples, **columns)
    evals = load_split(args.dataset, args.data_path, args.eval_split, **columns) if args.eval_split else None
    return train, evals


def main(argv: Sequence[str] | None = None) -> int:
    """`train.py` / `leanvlp-train`: train, save the folder (model, processor, card, summary), print the numbers."""
    try:
        model_args, data_args, train_args = parse_args(argv)
    except UsageError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
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
            if not rows:
                return None
            out = caption_report(m, processor, rows, data_args.task, data_args.max_new_tokens)
            return {**out, **object_mentions(out, eval_data)} if data_args.task == "caption" else out
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
    from ..model_card import push_to_hub, write_model_card

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
