"""Tasks caption and vqa: generated text against references (BLEU / CIDEr-D / ROUGE-L, or VQA soft accuracy),
and the teacher-forced token accuracy on each row's target. One report per family, the same keys."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..data.collate import MergeBridgeCollator
from ..data.pairs import decode_image, task_rows
from ..data.shapes import COLOURS, PLURALS, SHAPES, SIZES
from ..metrics import caption_metrics, mentioned_objects, object_mention_scores, vqa_accuracy
from .arguments import EvalArguments
from .inputs import pixels_on_model, to_model


def _report(task: str, rows: Dataset, predictions: list[str], references: list[list[str]], correct: int,
            total: int) -> dict[str, Any]:
    """Every family's generation report: token accuracy, the task's metrics, an example, the row count, and every
    prediction with its row's image id and references (for object mentions and printed examples)."""
    report: dict[str, Any] = {"token_accuracy": correct / max(total, 1)}
    if task == "vqa":
        report["vqa_accuracy"] = vqa_accuracy(predictions, references)
    else:
        report.update(caption_metrics(predictions, references))
    report["example"] = predictions[0] if predictions else ""
    report["images"] = len(predictions)
    report["predictions"], report["references"] = predictions, references
    report["image_ids"] = [str(i) for i in rows["image_id"]] if "image_id" in rows.column_names else []
    return report


def present_objects(data: Dataset) -> dict[str, set[tuple[str, str]]]:
    """image id -> the (colour, shape) pairs its boxes hold: label = shape, the box attribute that is a shapes
    colour = colour. Empty when the data annotates no colours (COCO, captions-only sets)."""
    if not {"image_id", "box_labels", "box_attributes"} <= set(data.column_names or []):
        return {}
    table = data.select_columns(["image_id", "box_labels", "box_attributes"])[:]
    out: dict[str, set[tuple[str, str]]] = {}
    for image_id, labels, attributes in zip(table["image_id"], table["box_labels"], table["box_attributes"]):
        colours = [next((a for a in attrs if a in COLOURS), None) for attrs in attributes or []]
        out[str(image_id)] = {(c, label) for c, label in zip(colours, labels or []) if c is not None}
    return out if any(out.values()) else {}


def object_mentions(report: dict[str, Any], data: Dataset) -> dict[str, float]:
    """Object precision / recall / F1 of a caption report's predictions against the shapes objects of `data`
    ({} when `data` annotates no colours, or the report is not one caption per image of `data`)."""
    present = present_objects(data)
    ids = report.get("image_ids") or []
    if not present or not ids or any(i not in present for i in ids):
        return {}
    spellings = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
    mentioned = [mentioned_objects(p, COLOURS, spellings, SIZES) for p in report["predictions"]]
    return object_mention_scores(mentioned, [present[i] for i in ids])


@torch.no_grad()
def caption_report(model: Any, processor: Any, rows: Dataset, task: str, max_new_tokens: int = 20,
                   batch_size: int = 32, num_beams: int = 1, progress: bool = False) -> dict[str, float]:
    """Greedy (or beam) captions (or answers) for held-out rows: CIDEr / BLEU / ROUGE-L (or VQA accuracy), and
    teacher-forced token accuracy on each row's target (first reference caption / majority answer)."""
    was_training = model.training
    model.eval()
    collator = MergeBridgeCollator(processor, task)
    predictions, references, correct, total = [], [], 0, 0
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=task, unit="batch", disable=not progress):
        batch_rows = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        images, batch_rows = collator.images_and_rows(batch_rows)
        prompts = [collator.prompt(r["question"]) for r in batch_rows]
        inputs = to_model(processor(images=images, text=prompts), model)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams)
        predictions += processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        references += [r["references"] for r in batch_rows]
        forced = to_model(processor(images=images, text=prompts, targets=[r["target"] for r in batch_rows]), model)
        logits = model(**forced).logits[:, :-1]
        labels = forced["labels"][:, 1:]
        keep = labels != -100
        correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
    model.train(was_training)
    return _report(task, rows, predictions, references, correct, total)


@torch.no_grad()
def patch_align_generation_report(model: Any, processor: Any, rows: Dataset, task: str, max_new_tokens: int = 20,
                                  batch_size: int = 32, num_beams: int = 1, progress: bool = False) -> dict[str, Any]:
    """PatchAlign captions (or answers, from the question) for held-out rows: the same report as `caption_report`."""
    was_training = model.training
    model.eval()
    predictions, references, correct, total = [], [], 0, 0
    tokenizer = processor.tokenizer
    for start in tqdm(range(0, len(rows), batch_size), desc=task, unit="batch", disable=not progress):
        batch_rows = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        images = [decode_image(r["image"], r["image_id"]) for r in batch_rows]
        pixels = pixels_on_model(processor, images, model)
        question = {}
        if task == "vqa":
            q = tokenizer([r["question"] for r in batch_rows], padding=True, truncation=True,
                          max_length=processor.max_length, return_tensors="pt").to(model.device)
            question = {"question_input_ids": q["input_ids"], "question_attention_mask": q["attention_mask"]}
        generated = model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                                   num_beams=num_beams, **question)
        predictions += tokenizer.batch_decode(generated, skip_special_tokens=True)
        references += [r["references"] for r in batch_rows]
        target = tokenizer([r["target"] for r in batch_rows], padding=True, truncation=True,
                           max_length=processor.max_length, return_tensors="pt").to(model.device)
        logits = model(pixel_values=pixels, input_ids=target["input_ids"], attention_mask=target["attention_mask"],
                       **question).logits[:, :-1]
        labels, keep = target["input_ids"][:, 1:], target["attention_mask"][:, 1:].bool()
        correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
    model.train(was_training)
    return _report(task, rows, predictions, references, correct, total)


def run_generation_task(ev: Any, data: Dataset, args: EvalArguments) -> dict[str, Any]:
    """The caption / vqa entry of eval_results.json: the evaluator's report on the task's rows."""
    report = ev.generate_report(task_rows(data, args.task), args.task, args)
    if args.task == "caption":
        report.update(object_mentions(report, data))
    metrics = {k: v for k, v in report.items() if isinstance(v, float)}
    noun = "questions" if args.task == "vqa" else "images"
    return {"metrics": metrics, f"num_{noun}": report["images"], "example": report["example"]}
