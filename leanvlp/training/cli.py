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

from ..cli_args import UsageError
from ..data import make_shapes_dataset
from ..data.collate import ImageCollator, MergeBridgeCollator, PatchAlignCollator
from ..data.pairs import eval_rows, load_split, to_pairs
from ..data.shapes import HELD_OUT_START, make_shapes_held_out
from ..data.webdataset import WebDatasetStateCallback, WebDatasetStream, load_webdataset
from ..evaluation import caption_report, patch_align_report
from ..evaluation.arguments import dataset_fields
from ..evaluation.generation import object_mentions, present_objects
from .arguments import DataArguments, ModelArguments, parse_args
from .models import annotation_vocab, apply_lora, build_merge_bridge, build_patch_align, corpus_of
from .shapes_tower import RECIPE as SHAPES_TOWER_RECIPE
from .trainer import CollatorEpoch, LeanTrainer, is_loss_term, save_loss_curve


def load_schema_data(args: DataArguments, image_size: int, seed: int = 0) -> tuple[Any, Dataset | None]:
    """Train and eval sets in leanvlp's row schema (see `leanvlp.data.schema`)."""
    if args.dataset == "shapes":  # images 0.. for training, the held-out split eval.py scores too
        size = max(image_size, 32)
        return make_shapes_dataset(args.num_train_images, image_size=size), make_shapes_held_out(
            args.num_eval_images, image_size=size)
    if args.data_path is None:
        raise UsageError(f"--dataset {args.dataset}: --data_path is required")
    if args.dataset == "webdataset":
        return load_webdataset(args.data_path, seed=seed, shuffle_buffer=args.shuffle_buffer,
                               skip_bad_samples=args.skip_bad_samples), None
    columns = {"image_column": args.image_column, "caption_column": args.caption_column}
    train = load_split(args.dataset, args.data_path, args.train_split, streaming=args.streaming,
                       skip_bad=args.skip_bad_samples, **columns)
    evals = load_split(args.dataset, args.data_path, args.eval_split, **columns) if args.eval_split else None
    return train, evals


def has_rows(data: Dataset | None) -> bool:
    """A (non-streamed) split with at least one row."""
    return isinstance(data, Dataset) and len(data) > 0


def consensus_caption(captions: Sequence[str]) -> str:
    """The caption that shares the most words with the image's other captions (ties: the longer, then the first):
    the reference most representative of them all, as CIDEr's consensus view has it."""
    words = [set(c.lower().split()) for c in captions]
    scores = [(sum(len(w & o) for j, o in enumerate(words) if j != i), len(captions[i]), -i)
              for i, w in enumerate(words)]
    return captions[max(range(len(captions)), key=lambda i: scores[i])]


def consensus_captions(data: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """Each image with only its consensus caption (`consensus_caption`): one target per image."""
    return data.map(lambda row: {"captions": [consensus_caption(row["captions"])] if row["captions"] else []})


def main(argv: Sequence[str] | None = None) -> int:
    """`train.py` / `leanvlp-train`: train, save the folder (model, processor, card, summary), print the numbers."""
    try:
        model_args, data_args, train_args = parse_args(argv)
    except UsageError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    set_seed(train_args.seed)
    start = time.time()
    train_data, eval_data = load_schema_data(data_args, model_args.tiny_image_size, train_args.seed)
    # a stream is split per process: every process builds its vocabulary from the whole stream alike
    whole = train_data.unsplit() if isinstance(train_data, WebDatasetStream) else train_data
    patch_align = model_args.family == "patch_align"
    if patch_align:
        vocab = annotation_vocab(whole)
        model, processor = build_patch_align(model_args, data_args.task, corpus_of(whole), vocab)
        pairs = to_pairs(train_data, data_args.task, annotations=True)
        eval_pairs = None
        if has_rows(eval_data):
            scored = eval_data.select(range(min(data_args.num_eval_images, len(eval_data))))
            eval_pairs = to_pairs(scored, data_args.task, annotations=True) if len(scored) else None
        heads = model.config.semantic_heads
        collator: ImageCollator = PatchAlignCollator(
            processor, data_args.task, data_args.skip_bad_samples, boxes=vocab.has_boxes and data_args.task == "pretrain",
            region_features=heads["region_feature"]["enabled"], seed=train_args.seed)

        def report(m: Any) -> dict | None:
            return patch_align_report(m, processor, eval_data, data_args.task, data_args.num_eval_images,
                                      data_args.max_new_tokens)
    else:
        model, processor = build_merge_bridge(model_args, corpus_of(whole))
        choose = consensus_captions if data_args.task == "caption" and data_args.train_captions == "consensus" else None
        pairs = to_pairs(choose(train_data) if choose else train_data, data_args.task)
        eval_pairs = None
        if has_rows(eval_data):  # the held-out loss, on the same kind of targets as training
            scored = eval_data.select(range(min(data_args.num_eval_images, len(eval_data))))
            eval_pairs = to_pairs(choose(scored) if choose else scored, data_args.task) if len(scored) else None
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
    if eval_pairs is not None:  # dataloader_drop_last applies to evaluation too: a smaller set still makes a batch
        train_args.per_device_eval_batch_size = min(train_args.per_device_eval_batch_size, len(eval_pairs))
    trainer = LeanTrainer(model=model, args=train_args, train_dataset=pairs, eval_dataset=eval_pairs,
                          data_collator=collator,
                          processing_class=processor, callbacks=[CollatorEpoch(collator)] if patch_align else None)
    if isinstance(pairs, WebDatasetStream):
        trainer.add_callback(WebDatasetStateCallback(pairs))  # saves / restores the position of the stream it reads
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
        _finish(trainer, final, processor, out, model_args, data_args, (train_data, eval_data), result, before, after,
                collator, start, push)
    return 0


def hub_datasets(args: DataArguments) -> list[str]:
    """The training data's Hub dataset ids for the card: an `hf` source that is not a local path; none for shapes
    (built in code) or a COCO folder."""
    if args.dataset == "hf" and args.data_path and not Path(args.data_path).exists():
        return [args.data_path]
    return []


PROJECT_LICENSE = "apache-2.0"  # leanvlp's: a model trained from scratch on its own data defaults to it


def training_data_line(args: DataArguments, data: Dataset | IterableDataset, model_args: ModelArguments) -> str:
    """What the model was trained on, for the card (no Hub id is invented for data or towers built in code)."""
    if args.dataset == "shapes":
        line = (f"{len(data):,} procedural shapes images (`leanvlp.data.make_shapes_dataset`, indices 0-"
                f"{len(data) - 1:,}; built in code, not a Hub dataset), task {args.task}")
    else:
        line = f"{args.data_path} (split {args.train_split}, {args.dataset}), task {args.task}"
    if model_args.tiny_vision_init == "shapes":
        recipe = SHAPES_TOWER_RECIPE
        line += (f"; vision tower: leanvlp's embedded tiny ViT, pretrained on shapes images 0-"
                 f"{recipe['num_images'] - 1:,} with semantic heads (`leanvlp.training.shapes_tower`)")
    return line


def held_out_where(args: DataArguments) -> str:
    """Which images the before / after numbers score."""
    if args.dataset == "shapes":
        return f"shapes held-out split: images {HELD_OUT_START:,} on, as eval.py scores"
    return f"split {args.eval_split}"


def example_lines(before: dict[str, Any], after: dict[str, Any], objects: dict[str, set], count: int = 3) -> list[str]:
    """The first `count` held-out rows: the generated text before and after training next to the ground truth
    (the first reference, and the image's objects when the data names them)."""
    lines = []
    for i in range(min(count, len(after.get("predictions") or []))):
        image_id = (after.get("image_ids") or [""] * (i + 1))[i]
        truth = after["references"][i][0] if after["references"][i] else ""
        lines.append(f"example {i + 1} ({image_id})")
        lines.append(f"   before:       {before['predictions'][i]!r}")
        lines.append(f"   after:        {after['predictions'][i]!r}")
        lines.append(f"   ground truth: {truth!r}" + (f" (+{len(after['references'][i]) - 1} more)"
                                                       if len(after["references"][i]) > 1 else ""))
        if objects.get(image_id):
            lines.append("   objects:      " + ", ".join(f"{c} {s}" for c, s in sorted(objects[image_id])))
    return lines


def visual_tokens(model: Any) -> dict[str, Any]:
    """Visual tokens per image as the config predicts them, for the summary and the end-of-run line."""
    config = model.config
    if config.model_type == "patch_align":
        det = config.patch_detector
        out = config.num_image_tokens  # CLS + kept + the fused token, after any merging in the tower
        return {"visual_tokens": out, "line": f"{1 + config.num_patches} -> {out} (patch detector after block "
                f"{det['layer']}, keep ratio {det['keep_ratio']})", "patch_detector": det}
    return {"visual_tokens": config.num_image_tokens, "bridge_merging": config.bridge_merging,
            "line": f"{config.num_vision_tokens} -> {config.num_image_tokens} (bridge merging r="
                    f"{config.bridge_merging['r']}, mode {config.bridge_merging['mode']})"}


def _finish(trainer: Trainer, model: Any, processor: Any, out: Path, model_args: ModelArguments,
            data_args: DataArguments, data: tuple[Dataset | IterableDataset, Dataset | None], result: Any,
            before: dict | None, after: dict | None, collator: ImageCollator, start: float, push: bool) -> None:
    from ..model_card import base_model_licenses, card_kwargs_from_folder, push_to_hub, write_model_card

    train_data, eval_data = data

    if model_args.lora_r > 0:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    curve = save_loss_curve(trainer.state.log_history, out / "loss_curve.png",
                            title=f"{model_args.family} {data_args.task}: training and held-out loss")
    dataset_id = dataset_fields(data_args.dataset, data_args.data_path, "", 0)["dataset"]
    results = []
    report_task = "retrieval" if data_args.task == "pretrain" else data_args.task  # pretraining reports retrieval
    if after is not None:
        metrics = {k: v for k, v in after.items() if isinstance(v, float) and k != "images"}
        split = "held-out" if data_args.dataset == "shapes" else data_args.eval_split or ""
        fields = dataset_fields(data_args.dataset, data_args.data_path, split, after["images"])
        results.append({"task": report_task, **fields, "num_images": after["images"], "metrics": metrics})
        (out / "eval_results.json").write_text(json.dumps({"results": results}, indent=2))
    tokens = visual_tokens(model)
    history = trainer.state.log_history
    base_models = [m for m in (model_args.vision_model, model_args.text_model) if m]
    logged = {h["step"]: {k: v for k, v in h.items() if k == "itc_columns" or is_loss_term(k)}
              for h in history if "loss" in h}
    summary = {
        "family": model_args.family, "task": data_args.task, "dataset": dataset_id,
        "train_images": len(train_data) if isinstance(train_data, Dataset) else "streamed",
        "steps": trainer.state.global_step, "epochs": round(float(trainer.state.epoch or 0.0), 2),
        "train_loss": round(result.training_loss, 4),
        "eval_loss": next((round(h["eval_loss"], 4) for h in reversed(history) if "eval_loss" in h), None),
        "wall_clock_s": round(time.time() - start, 1),
        **{k: v for k, v in tokens.items() if k != "line"},
        "frozen": {"vision": bool(model_args.freeze_vision), "llm": bool(model_args.freeze_llm)},
        "skipped_samples": len(collator.skipped), "world_size": trainer.args.world_size,
        "base_models": base_models,
        "datasets": hub_datasets(data_args),
        "license": model_args.license or (None if base_models else PROJECT_LICENSE),
        "base_model_licenses": base_model_licenses(base_models),
        "training_data": training_data_line(data_args, train_data, model_args),
        "losses": {h["step"]: h["loss"] for h in history if "loss" in h},
        "logged": {step: parts for step, parts in logged.items() if parts},
    }
    summary = {k: v for k, v in summary.items() if v is not None and v != {}}  # no empty entries
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    card_kwargs = card_kwargs_from_folder(out)
    write_model_card(out, **card_kwargs)  # from the folder alone: the card eval.py regenerates is the same
    print("\n" + "=" * 72)
    print(f"leanvlp: trained {model_args.family} for {summary['steps']} steps in {summary['wall_clock_s']} s; "
          f"final train loss {summary['train_loss']}")
    print(f"visual tokens per image: {tokens['line']}")
    if before is not None and after is not None:
        keys = [k for k in ("object_f1", "object_precision", "object_recall", "cider", "bleu_4", "vqa_accuracy",
                            "token_accuracy", "i2t_r1", "t2i_r1", "r_mean", "pta_precision") if k in after]
        print(f"held-out ({after['images']} images, {held_out_where(data_args)}), before -> after training:")
        for i in range(0, len(keys), 4):
            print("   " + "   ".join(f"{k}: {before[k]:.3f} -> {after[k]:.3f}" for k in keys[i:i + 4]))
        for line in example_lines(before, after, present_objects(eval_data) if has_rows(eval_data) else {}):
            print(line)
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
