"""Experiment (b) of issue #15: does text-aware pruning with the PTA-trained detector keep accuracy at keep 0.5?

Claim under test (COPA; methods.md section 3): keeping the half of the patches that the text-aware patch detector
(trained with the patch-text alignment loss, PTA) ranks highest loses no accuracy on the text-aware paths (MLM,
VQA) against no pruning. Set-up, every variant alike:

- data: the embedded shapes set at 48 px (36 patches of 8 px), images with 3-4 objects only; a training pair per
  object: "there is a <colour> <shape>" (always "a": "an" would give away "orange"), so the text names one object
  among 2-3 distractors; PTA's patch labels mark that object's box only (the processor gets its box alone).
- model: tiny PatchAlign from scratch through the training recipe (`build_patch_align`, as experiment (a)), detector
  on after block 2 of 4, objectives ITC + ITM + MLM (+ PTA), captioning LM weight 0, MLM probability 0.3 (the
  caption has 5 words; 0.15 would mask an object word in under a third of the pairs), text init std 0.1 (see (a)).
- variants (`patch_detector`): keep1.0 (keep_ratio 1.0: no pruning; PTA still trains the detector) /
  detector_pta (keep 0.5, the detector ranks) / detector_no_pta (keep 0.5, PTA weight 0: the detector learns only
  through the fused token's weights) / random (keep 0.5, `selection="random"`) / cls_cosine (keep 0.5,
  `selection="cls_cosine"`, the parameter-free text-agnostic scores). In the last two the detector is still built
  and trained by PTA (so the tower gets the same PTA gradient as detector_pta) but chooses nothing.
- pairing: seed s fixes the initial weights (every variant has the same modules), the data order and the MLM masks
  (`sample_seed`); random selection draws from torch's global generator during training, which also shifts that
  variant's hard-negative draws.
- MLM evaluation (every `eval_every` steps and at step 0) on 500 held-out images, one item per image: "there is a
  [MASK] <shape>" (that shape is unique in the image) or "there is a <colour> [MASK]" (that colour is unique), the
  object chosen per image with a fixed generator; the masked caption's [CLS] drives the detector, the text-aware
  tokens (`PatchAlignModel.encode_image(pixels, text_cls=...).aware`, the tokens the MLM loss reads in training)
  go through the fusion layers and the MLM head. The same call returns the detector's logits and the ranking
  scores (`scores`: the detector's sigmoid, or the CLS-cosine / random scores), scored against the named object's
  patches: AUROC (per image, then mean), precision@|object| (R-precision), the object's patches kept in the top K
  (recall@K, K = 18), and the named-vs-distractor AUROC (the named object's patches against the other objects'
  patches only: 0.5 for any scorer that ignores the text). A check recorded per evaluation: the share of images
  whose text-aware tokens differ from the text-agnostic ones (0 with keep 1.0 and with cls_cosine, by design).
- VQA: after pretraining, each model is fine-tuned `vqa_steps` steps as `PatchAlignForQuestionAnswering` (the
  question prunes the image text-aware, is fused with it, an answer decoder generates) on the training images'
  colour / shape questions ("what color is the circle?", "what shape is the red object?"); accuracy = the greedy
  first answer token (every answer is one word) on the held-out images' colour / shape questions.
- controls: image-blind, always answering the most common word (MLM) / the most common answer per question kind
  (VQA); random and CLS-cosine selection.
- decision: non-inferiority of detector_pta vs keep1.0 with a margin of 2 points: the paired difference over
  seeds (final MLM accuracy, VQA accuracy), 95% t-interval (t(0.975, 2) = 4.303 with 3 seeds): held when its
  lower end is above -0.02, did not hold when its upper end is below -0.02, inconclusive otherwise. The other
  comparisons (detector_pta minus each ablation) are superiority: held when the interval is above 0.
- time: process CPU seconds (`time.process_time()`, 1 thread), which a shared machine does not inflate.

Resumable: one JSON per (variant, seed) under benchmarks/results/evidence/b_pta_keep/; a finished run is skipped.
The report (benchmarks/results/evidence.md between this experiment's markers, and evidence_b_pta_keep.png) is
rewritten from the JSON files after every run, or alone with --report.

    python benchmarks/evidence/pta_keep.py                 # ~30 CPU min on 1 thread (~60 wall, shared 2 cores)
    python benchmarks/evidence/pta_keep.py --report        # tables and plot from the JSON files
    python benchmarks/evidence/pta_keep.py --pilot         # seconds per step and per evaluation
    python benchmarks/evidence/pta_keep.py --variants random --seeds 1   # one run again (same numbers)
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from semantic_losses import (  # noqa: E402  (experiment a's helpers: data, recipe arguments, statistics)
    T_975,
    EvaluateEvery,
    chosen_runs,
    experiment_parser,
    interval,
    mean_sd,
    model_args,
    shapes_with_objects,
)

from leanvlp.data.collate import PatchAlignCollator  # noqa: E402
from leanvlp.data.pairs import to_pairs  # noqa: E402
from leanvlp.modeling.configuration_patch_align import PatchAlignConfig  # noqa: E402
from leanvlp.modeling.modeling_patch_align import (  # noqa: E402
    PatchAlignForPreTraining,
    PatchAlignForQuestionAnswering,
)
from leanvlp.processing.boxes import patch_labels_from_boxes  # noqa: E402
from leanvlp.training import (  # noqa: E402
    CollatorEpoch,
    LeanTrainer,
    LeanTrainingArguments,
    annotation_vocab,
    build_patch_align,
    corpus_of,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "evidence" / "b_pta_keep"
REPORT = RESULTS / "evidence.md"
PLOT = RESULTS / "evidence_b_pta_keep.png"
BEGIN = "<!-- experiment b: begin (written by benchmarks/evidence/pta_keep.py) -->"
END = "<!-- experiment b: end -->"
AFTER = "<!-- experiment a: end -->"  # this section goes after experiment (a)'s

VARIANTS = {
    "keep1.0": dict(keep_ratio=1.0, selection="detector", pta=1.0),
    "detector_pta": dict(keep_ratio=0.5, selection="detector", pta=1.0),
    "detector_no_pta": dict(keep_ratio=0.5, selection="detector", pta=0.0),
    "random": dict(keep_ratio=0.5, selection="random", pta=1.0),
    "cls_cosine": dict(keep_ratio=0.5, selection="cls_cosine", pta=1.0),
}
METRICS = {"mlm_acc": "masked object-word accuracy", "rank_auroc": "AUROC of the ranking scores (named object)",
           "detector_auroc": "detector AUROC (named object)", "distractor_auroc": "named-vs-distractor AUROC",
           "r_precision": "precision at the object's patch count (R-precision)",
           "recall_at_k": "object patches kept (recall@K)"}
SETTINGS = dict(
    image_size=48, patch_size=8, vision_hidden=64, vision_layers=4, text_hidden=64, text_layers=2, fusion_layers=1,
    embed_dim=64, detector_layer=2, batch_size=32, steps=640, eval_every=80, vqa_steps=240, learning_rate=1e-3,
    warmup=0.05, weight_decay=0.05, train_images=2000, eval_images=500, min_objects=3, data_seed=0, eval_seed=7,
    text_init_std=0.1, mlm_probability=0.3,
)
MARGIN = 0.02  # non-inferiority margin (accuracy points / 100)


# ----------------------------------------------------------------------------- data


def named(colour: str, shape: str) -> str:
    return f"there is a {colour} {shape}"


def training_pairs(data: Any) -> Dataset:
    """One pair per object: the caption names it, its box alone marks the PTA labels."""
    data = data.cast_column("image", ImageFeature(decode=False))
    rows: dict[str, list] = {k: [] for k in ("image", "image_id", "question", "target", "references", "boxes",
                                              "box_labels")}
    for i, row in enumerate(data):
        for box, shape, attrs in zip(row["boxes"], row["box_labels"], row["box_attributes"]):
            for key, value in (("image", row["image"]), ("image_id", row["image_id"]), ("question", ""),
                               ("target", named(attrs[0], shape)), ("references", []), ("boxes", [box]),
                               ("box_labels", [shape])):
                rows[key].append(value)
    return Dataset.from_dict(rows).cast_column("image", ImageFeature(decode=False))


def vqa_pairs(data: Any) -> Dataset:
    """The colour / shape questions (the kinds that name one object) as `to_pairs` rows."""
    pairs = to_pairs(data, "vqa")
    return pairs.filter(lambda r: r["question"].startswith(("what color", "what shape")))


def eval_set(data: Any, s: dict[str, Any]) -> dict[str, Any]:
    """Held-out MLM items (one per image), the named object's and the distractors' patch labels, VQA items."""
    rows = data.cast_column("image", ImageFeature(decode=False))
    images = [PIL.Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in rows]
    masked, targets, kinds, labels, distractors = [], [], [], [], []
    grid = s["image_size"] // s["patch_size"]
    for i, r in enumerate(rows):
        shapes, colours = r["box_labels"], [a[0] for a in r["box_attributes"]]
        options = [(j, "colour") for j in range(len(shapes)) if shapes.count(shapes[j]) == 1]
        options += [(j, "shape") for j in range(len(shapes)) if colours.count(colours[j]) == 1]
        j, kind = options[int(np.random.default_rng([s["eval_seed"], i]).integers(len(options)))]
        masked.append(named("[MASK]", shapes[j]) if kind == "colour" else named(colours[j], "[MASK]"))
        targets.append(colours[j] if kind == "colour" else shapes[j])
        kinds.append(kind)
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in r["boxes"]], dtype=np.float64)
        marks = patch_labels_from_boxes(xyxy, s["image_size"], s["image_size"], s["patch_size"])  # (M, P)
        labels.append(marks[j])
        distractors.append(marks[[m for m in range(len(shapes)) if m != j]].any(0) & ~marks[j])
    assert len(labels[0]) == grid * grid
    vqa = vqa_pairs(data)
    vqa_images = {r["image_id"]: k for k, r in enumerate(rows)}
    return dict(images=images, masked=masked, targets=targets, kinds=kinds,
                labels=torch.tensor(np.array(labels), dtype=torch.float32),
                distractors=torch.tensor(np.array(distractors), dtype=torch.float32),
                vqa_questions=vqa["question"], vqa_answers=vqa["target"],
                vqa_image=[vqa_images[str(i)] for i in vqa["image_id"]])


# ----------------------------------------------------------------------------- model


def config_for(s: dict[str, Any], variant: str, train: Any) -> tuple[PatchAlignConfig, Any]:
    """The recipe's tiny PatchAlign config with this variant's detector; the recipe's processor."""
    v = VARIANTS[variant]
    recipe, processor = build_patch_align(model_args(s, []), "pretrain", corpus_of(train), annotation_vocab(train))
    config = recipe.config.to_dict()
    config.update(
        patch_detector={"enabled": True, "layer": s["detector_layer"], "keep_ratio": v["keep_ratio"],
                        "selection": v["selection"]},
        loss_weights={**config["loss_weights"], "lm": 0.0, "pta": v["pta"]},
        mlm_probability=s["mlm_probability"],
        text_config={**config["text_config"], "initializer_range": s["text_init_std"]},
    )
    return PatchAlignConfig.from_dict(config), processor


def auroc(scores: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row AUROC (B,) of scores (B, P) for positives labels (B, P) against negatives (default: the rest);
    ties count one half; NaN for a row without both."""
    negatives = 1 - labels if negatives is None else negatives
    pos, neg = labels.bool(), negatives.bool()
    diff = scores[:, :, None] - scores[:, None, :]  # (B, P, P): positive i vs negative j
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    pairs = pos[:, :, None] & neg[:, None, :]
    return (wins * pairs).sum((1, 2)) / pairs.sum((1, 2)).float()  # NaN where no pair


@torch.no_grad()
def evaluate(model: PatchAlignForPreTraining, processor: Any, items: dict[str, Any], batch_size: int = 100,
             seed: int = 0) -> dict[str, float]:
    """MLM accuracy and the ranking / detector scores against the named object's patches, through the text-aware
    path (`encode_image(text_cls=masked caption's [CLS]).aware`). Random selection draws from a fixed seed in a
    forked generator, so evaluating does not move the training's random stream."""
    was_training = model.training
    model.eval()
    pa, tok = model.patch_align, processor.tokenizer
    correct, per_row = 0, {k: [] for k in ("rank_auroc", "detector_auroc", "distractor_auroc", "r_precision",
                                             "recall_at_k", "aware_differs")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(items["masked"]), batch_size):
            stop = start + batch_size
            text = tok(items["masked"][start:stop], padding=True, return_tensors="pt")
            pixels = processor.image_processor(items["images"][start:stop], return_tensors="pt")["pixel_values"]
            where = text["input_ids"] == tok.mask_token_id  # (B, T), one per row
            if not torch.equal(where.sum(1), torch.ones(where.shape[0], dtype=torch.long)):
                raise RuntimeError("every masked caption must hold exactly one [MASK]")
            encoded = pa.encode_text(text["input_ids"], text["attention_mask"])
            enc = pa.encode_image(pixels, text_cls=encoded[:, 0])
            logits = model.mlm_head(pa.fuse(encoded, text["attention_mask"], enc.aware))[where]  # (B, V)
            target = torch.tensor(tok.convert_tokens_to_ids(items["targets"][start:stop]))
            correct += int((logits.argmax(-1) == target).sum())
            labels, others = items["labels"][start:stop], items["distractors"][start:stop]  # (B, P)
            # the detector's logits rank as its sigmoid scores without float ties at saturation
            ranking = enc.logits if model.config.patch_detector["selection"] == "detector" else enc.scores
            per_row["rank_auroc"] += auroc(ranking, labels).tolist()
            per_row["detector_auroc"] += auroc(enc.logits, labels).tolist()
            per_row["distractor_auroc"] += auroc(ranking, labels, others).tolist()
            n_pos = labels.sum(1).long()  # (B,)
            order = ranking.argsort(dim=1, descending=True)
            hits = labels.gather(1, order)  # (B, P) labels in ranking order
            per_row["r_precision"] += [float(hits[b, :n].mean()) for b, n in enumerate(n_pos.tolist())]
            kept = torch.zeros_like(labels).scatter(1, enc.kept, 1.0)  # (B, P)
            per_row["recall_at_k"] += ((kept * labels).sum(1) / n_pos).tolist()
            per_row["aware_differs"] += [float(not torch.equal(a, g)) for a, g in zip(enc.aware, enc.agnostic)]
    model.train(was_training)
    out = {"mlm_acc": correct / len(items["masked"])}
    for key, values in per_row.items():
        values = [v for v in values if v == v]  # rows with both kinds of patch
        out[key] = sum(values) / len(values)
    return out


class EvaluatePTA(EvaluateEvery):
    """Experiment (a)'s schedule and CPU / wall bookkeeping with this experiment's evaluation."""

    def __init__(self, model: Any, processor: Any, items: dict[str, Any], every: int, seed: int) -> None:
        super().__init__(model, processor, items, every)
        self.seed = seed

    def _evaluate(self, step: int) -> None:
        self.train_seconds += time.perf_counter() - self._since
        self.cpu_seconds += time.process_time() - self._cpu_since
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = evaluate(self.model, self.processor, self.items, seed=self.seed)
        self.eval_seconds += time.perf_counter() - start
        self.eval_cpu_seconds += time.process_time() - cpu_start
        self.curve.append({"step": step, "train_seconds": round(self.train_seconds, 3),
                           "train_cpu_seconds": round(self.cpu_seconds, 3), **metrics})
        print(f"    step {step:4d} {self.cpu_seconds:6.1f}s cpu  "
              + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        self._since, self._cpu_since = time.perf_counter(), time.process_time()


def training_args(out: str, s: dict[str, Any], seed: int, steps: int) -> LeanTrainingArguments:
    return LeanTrainingArguments(
        output_dir=out, per_device_train_batch_size=s["batch_size"], max_steps=steps,
        learning_rate=s["learning_rate"], warmup_steps=s["warmup"], weight_decay=s["weight_decay"],
        lr_scheduler_type="cosine", save_strategy="no", logging_steps=max(1, steps // 8), report_to=[], seed=seed,
        data_seed=seed, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)


@torch.no_grad()
def vqa_accuracy(model: PatchAlignForQuestionAnswering, processor: Any, items: dict[str, Any],
                 batch_size: int = 100, seed: int = 0) -> float:
    """Greedy first answer token (the decoder starts from [CLS]) against the one-word answer."""
    model.eval()
    tok, correct, n = processor.tokenizer, 0, len(items["vqa_questions"])
    answers = tok.convert_tokens_to_ids(items["vqa_answers"])
    if tok.unk_token_id in answers:
        raise RuntimeError("a VQA answer is not one word of the tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            q = tok(items["vqa_questions"][start:stop], padding=True, return_tensors="pt")
            images = [items["images"][k] for k in items["vqa_image"][start:stop]]
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            prompt = torch.full((stop - start, 1), model.config.cls_token_id)
            logits = model(input_ids=prompt, pixel_values=pixels, question_input_ids=q["input_ids"],
                           question_attention_mask=q["attention_mask"]).logits[:, 0]  # (B, V)
            correct += int((logits.argmax(-1) == torch.tensor(answers[start:stop])).sum())
    return correct / n


def run(variant: str, seed: int, s: dict[str, Any], train: Any, items: dict[str, Any], steps: int | None = None,
        vqa_steps: int | None = None) -> dict[str, Any]:
    config, processor = config_for(s, variant, train)
    set_seed(seed)
    model = PatchAlignForPreTraining(config)
    collator = PatchAlignCollator(processor, "pretrain", boxes=True, seed=seed)
    steps = s["steps"] if steps is None else steps
    evaluator = EvaluatePTA(model, processor, items, s["eval_every"], s["eval_seed"])
    with tempfile.TemporaryDirectory() as out:
        trainer = LeanTrainer(model=model, args=training_args(out, s, seed, steps), train_dataset=training_pairs(train),
                              data_collator=collator, processing_class=processor,
                              callbacks=[CollatorEpoch(collator), evaluator])
        trainer.train()
    losses = [{k: v for k, v in log.items() if k == "step" or "loss" in k} for log in trainer.state.log_history]
    # VQA: the same weights as an answer model (its decoder and LM head start untrained: the LM weight was 0)
    vqa_steps = s["vqa_steps"] if vqa_steps is None else vqa_steps
    set_seed(seed)
    qa = PatchAlignForQuestionAnswering(config)
    missing, _ = qa.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"VQA model: weights missing from the pretrained model: {missing[:5]}")
    vqa_collator = PatchAlignCollator(processor, "vqa", seed=seed)
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as out:
        LeanTrainer(model=qa, args=training_args(out, s, seed, vqa_steps), train_dataset=vqa_pairs(train),
                    data_collator=vqa_collator, processing_class=processor).train()
    vqa_cpu = time.process_time() - cpu
    vqa = vqa_accuracy(qa, processor, items, seed=s["eval_seed"])
    print(f"    vqa after {vqa_steps} steps ({vqa_cpu:.1f}s cpu): {vqa:.3f}", flush=True)
    return {"variant": variant, "detector": VARIANTS[variant], "seed": seed, "settings": s, "curve": evaluator.curve,
            "vqa_acc": vqa, "vqa_train_cpu_seconds": round(vqa_cpu, 1), "vqa_items": len(items["vqa_questions"]),
            "eval_seconds": round(evaluator.eval_seconds, 1), "eval_cpu_seconds": round(evaluator.eval_cpu_seconds, 1),
            "train_losses": losses, "num_parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- analysis, report


def load_runs(runs_dir: Path = RUNS) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(runs_dir.glob("*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["variant"], {})[record["seed"]] = record
    return runs


def final(record: dict[str, Any], metric: str) -> float:
    return record["vqa_acc"] if metric == "vqa_acc" else record["curve"][-1][metric]


def blind_baselines(items: dict[str, Any]) -> dict[str, float]:
    """Image-blind: always the most common masked word; per VQA question kind (colour / shape) its most common
    answer."""
    targets = items["targets"]
    mlm = max(targets.count(t) for t in set(targets)) / len(targets)
    correct = 0
    for kind in ("what color", "what shape"):
        answers = [a for q, a in zip(items["vqa_questions"], items["vqa_answers"]) if q.startswith(kind)]
        correct += max(answers.count(a) for a in set(answers)) if answers else 0
    return {"mlm_acc": mlm, "vqa_acc": correct / max(1, len(items["vqa_answers"]))}


def decide(bounds: tuple[float, float] | None, threshold: float) -> str:
    """held: the interval lies above `threshold`; did not hold: below it; inconclusive: it straddles it."""
    if bounds is None:
        return "inconclusive (fewer than 2 paired seeds)"
    return "held" if bounds[0] > threshold else "did not hold" if bounds[1] < threshold else "inconclusive"


def paired(runs: dict[str, dict[int, dict[str, Any]]], a: str, b: str, metric: str) -> list[float]:
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    return [final(runs[a][k], metric) - final(runs[b][k], metric) for k in seeds]


def comparison_rows(runs: dict[str, dict[int, dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """Table rows and verdict lines: detector_pta vs keep1.0 (non-inferiority, margin MARGIN) and vs each
    ablation (superiority), on the final MLM and VQA accuracy."""
    rows, verdicts = [], []
    tests = [("keep1.0", -MARGIN, f"non-inferior to no pruning (margin {MARGIN:.2f})")]
    tests += [(v, 0.0, f"better than {v}") for v in ("detector_no_pta", "random", "cls_cosine")]
    for metric, name in (("mlm_acc", "MLM"), ("vqa_acc", "VQA")):
        for other, threshold, claim in tests:
            diffs = paired(runs, "detector_pta", other, metric)
            if not diffs:
                continue
            bounds = interval(diffs)
            text = decide(bounds, threshold)
            span = "-" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"
            rows.append(f"| {name} | detector_pta − {other} | {len(diffs)} | {mean_sd(diffs)} | {span} | "
                        f"{threshold:+.2f} | {text} |")
            verdicts.append(f"- {name}: detector+PTA at keep 0.5 {claim}: **{text}** (paired difference "
                            f"{statistics.mean(diffs):+.3f}, 95% interval {span}, {len(diffs)} seeds)")
    return rows, verdicts


def report(runs: dict[str, dict[int, dict[str, Any]]], blind: dict[str, float] | None = None) -> str:
    lines = [BEGIN, "", "## (b) PTA pruning keeps accuracy at keep 0.5?", ""]
    first = next((r for got in runs.values() for r in got.values()), None)
    if first is None:
        return "\n".join(lines + ["No finished run yet.", "", END])
    s = first["settings"]
    lines += [
        f"Tiny PatchAlign from scratch on shapes ({s['image_size']} px, {(s['image_size'] // s['patch_size']) ** 2} "
        f"patches, 3-4 objects per image, {s['train_images']} training images), one training pair per object: "
        "\"there is a <colour> <shape>\" (the text names one object among 2-3 distractors; PTA labels mark its box "
        f"alone). ITC + ITM + MLM (probability {s['mlm_probability']}) + PTA, detector after block "
        f"{s['detector_layer']} of {s['vision_layers']}; {s['steps']} steps of batch {s['batch_size']}, then "
        f"{s['vqa_steps']} steps of VQA fine-tuning (`PatchAlignForQuestionAnswering`, colour / shape questions). "
        f"Evaluation on {s['eval_images']} held-out images (MLM: one masked colour or shape word of the named object "
        f"per image; VQA: {first['vqa_items']} colour / shape questions, greedy first answer token), every "
        f"{s['eval_every']} steps for MLM and the scores. MLM and VQA read the text-aware tokens "
        "(`encode_image(text_cls=...).aware`: the masked caption's / the question's [CLS] drives the detector). "
        "Detector metrics are against the named object's patches (AUROC per image, then mean; R-precision; "
        "recall@K = share of its patches among the K kept); the named-vs-distractor AUROC compares its patches "
        "with the other objects' only (0.5 for a scorer that ignores the text). Variants: `keep1.0` no pruning "
        "(PTA still trains the detector); `detector_pta` keep 0.5 by the detector; `detector_no_pta` PTA weight 0; "
        "`random` / `cls_cosine` keep 0.5 by `patch_detector.selection` (the detector still trained by PTA, "
        "choosing nothing). Seeds pair the initial weights, data order and MLM masks. Written by "
        "`benchmarks/evidence/pta_keep.py` from `benchmarks/results/evidence/b_pta_keep/`; plot "
        "`evidence_b_pta_keep.png` (mean over seeds, band = min..max). CPU seconds: `time.process_time()`, 1 thread.",
        "",
    ]
    if blind:
        lines += [f"Image-blind control: always the most common masked word scores {blind['mlm_acc']:.3f}; the most "
                  f"common answer per question kind scores {blind['vqa_acc']:.3f} on VQA.", ""]
        finals = {m: [final(r, m) for got in runs.values() for r in got.values()] for m in ("mlm_acc", "vqa_acc")}
        above = {m: (min(v) - blind[m], max(v) - blind[m]) for m, v in finals.items()}
        lines += ["Every run's final accuracy minus the image-blind control: MLM "
                  f"{above['mlm_acc'][0]:+.3f} to {above['mlm_acc'][1]:+.3f}, "
                  f"VQA {above['vqa_acc'][0]:+.3f} to {above['vqa_acc'][1]:+.3f}.", ""]
    lines += ["### Final scores (mean ± sd over seeds)", "",
              "| variant | seeds | MLM acc | VQA acc | " + " | ".join(list(METRICS.values())[1:])
              + " | text-aware ≠ agnostic tokens |",
              "|---|---|---|---|" + "---|" * (len(METRICS) - 1) + "---|"]
    for variant in VARIANTS:
        got = list(runs.get(variant, {}).values())
        if not got:
            continue
        cells = [mean_sd([final(r, m) for r in got]) for m in ("mlm_acc", "vqa_acc", *list(METRICS)[1:])]
        differs = mean_sd([r["curve"][-1]["aware_differs"] for r in got], 2)
        lines.append(f"| {variant} | {len(got)} | " + " | ".join(cells) + f" | {differs} |")
    rows, verdicts = comparison_rows(runs)
    lines += ["", "### Paired differences (final accuracy, 95% t-interval over seeds)", "",
              "| metric | difference | seeds | mean ± sd | 95% interval | threshold | verdict |",
              "|---|---|---|---|---|---|---|", *rows, ""]
    lines += ["### Cost", "", "| variant | pretraining CPU seconds (1 thread) | VQA fine-tuning CPU seconds | "
              "evaluation CPU seconds | parameters |", "|---|---|---|---|---|"]
    for variant in VARIANTS:
        got = list(runs.get(variant, {}).values())
        if got:
            lines.append(f"| {variant} | {mean_sd([r['curve'][-1]['train_cpu_seconds'] for r in got], 0)} | "
                         f"{mean_sd([r['vqa_train_cpu_seconds'] for r in got], 0)} | "
                         f"{mean_sd([r['eval_cpu_seconds'] for r in got], 0)} | {got[0]['num_parameters']:,} |")
    lines += ["", "### Verdicts", "", *verdicts, "", END]
    return "\n".join(lines)


def write_report(runs: dict[str, dict[int, dict[str, Any]]], blind: dict[str, float] | None = None,
                 report_path: Path = REPORT, plot_path: Path | None = PLOT) -> None:
    """Replace this experiment's section (or add it after experiment (a)'s, else at the end) and redraw the plot."""
    section = report(runs, blind)
    text = report_path.read_text() if report_path.exists() else "# Evidence that the techniques keep quality\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    elif AFTER in text:
        cut = text.index(AFTER) + len(AFTER)
        text = text[:cut] + "\n\n" + section + text[cut:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    report_path.write_text(text)
    if plot_path is not None:
        plot(runs, plot_path)


def plot(runs: dict[str, dict[int, dict[str, Any]]], path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mlm_acc", "step"), ("mlm_acc", "train_cpu_seconds"), ("rank_auroc", "step"),
              ("distractor_auroc", "step")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (metric, x_key) in zip(axes.flat, panels):
        for variant in VARIANTS:
            curves = list(runs.get(variant, {}).values())
            if not curves:
                continue
            n = min(len(c["curve"]) for c in curves)
            x = np.mean([[p[x_key] for p in c["curve"][:n]] for c in curves], axis=0)
            y = np.array([[p[metric] for p in c["curve"][:n]] for c in curves])
            ax.plot(x, y.mean(0), label=f"{variant} ({len(curves)} seeds)")
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.15)
        ax.set_xlabel("training step" if x_key == "step" else "training CPU seconds (1 thread, mean over seeds)")
        ax.set_ylabel(METRICS[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Experiment (b): keep 0.5 by detector+PTA vs no pruning and ablations (mean, band = min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def prepare(s: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    train, next_index = shapes_with_objects(s["train_images"], 0, s)
    held_out, _ = shapes_with_objects(s["eval_images"], next_index, s)
    return train, eval_set(held_out, s)


def run_all(variants: list[str], seeds: list[int], s: dict[str, Any], train: Any, items: dict[str, Any],
            runs_dir: Path = RUNS, force: bool = False, on_run: Any = None) -> None:
    """Seed by seed (a partial set holds complete pairs); a finished run's JSON is kept unless `force`."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for variant in variants:
            path = runs_dir / f"{variant}_seed{seed}.json"
            if path.exists() and not force:
                if json.loads(path.read_text())["settings"] != s:
                    raise SystemExit(f"{path} was run with other settings; delete it or pass --force")
                print(f"skip {variant} seed {seed}: {path.name} exists", flush=True)
                continue
            print(f"run {variant} seed {seed}", flush=True)
            path.write_text(json.dumps(run(variant, seed, s, train, items), indent=1) + "\n")
            if on_run is not None:
                on_run()


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__.split("\n")[0], list(VARIANTS))
    args = parser.parse_args(argv)
    variants, seeds = chosen_runs(parser, args, list(VARIANTS))
    s = dict(SETTINGS)
    start = time.process_time()
    train, items = prepare(s)
    blind = blind_baselines(items)
    if args.report:
        write_report(load_runs(), blind)
        return 0
    print(f"data: {len(train)} training images, {len(items['masked'])} MLM items, {len(items['vqa_questions'])} VQA "
          f"items, {time.process_time() - start:.1f}s cpu; image-blind {blind}", flush=True)
    if args.pilot:
        for variant in variants:
            record = run(variant, seeds[0], {**s, "eval_every": 10 ** 9}, train, items, steps=10, vqa_steps=10)
            print(f"pilot {variant}: 10 steps {record['curve'][-1]['train_cpu_seconds']:.1f}s cpu, 2 evaluations "
                  f"{record['eval_cpu_seconds']:.1f}s cpu, 10 VQA steps {record['vqa_train_cpu_seconds']:.1f}s cpu",
                  flush=True)
        return 0
    run_all(variants, seeds, s, train, items, force=args.force, on_run=lambda: write_report(load_runs(), blind))
    write_report(load_runs(), blind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
