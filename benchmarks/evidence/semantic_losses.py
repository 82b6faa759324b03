"""Experiment (a) of issue #15: do the semantic visual losses make end-to-end PatchAlign converge faster?

Claim under test (Yang, Liu, Lin 2023; methods.md section 4): auxiliary object-class, attribute and region-feature
losses on the patch tokens make an end-to-end VLP model converge faster. Set-up, every variant alike:

- data: the embedded shapes set at 48 px, images with 3-4 objects only (more generated, the rest filtered out);
  training pairs are every caption of the training images; held-out: 500 other images of the same seed.
- model: tiny PatchAlign from scratch through the training recipe (`build_patch_align`, its word tokenizer and
  processor), patch detector OFF (every path reads the full tower output), objectives ITC + ITM + MLM (the
  captioning LM weight is 0: not measured here, and it would cost a third of each step).
- variants: none / class (object_class head) / attribute (colour + size) / region (region_feature head; teacher:
  a FIXED RANDOM PROJECTION of the box crop's pixels: crop resized to 8x8, RGB in [-0.5, 0.5], flattened (192)
  times a Gaussian matrix (192 x 32) / sqrt(192) drawn once from numpy seed 1234) / all (the three heads).
- pairing: seed s fixes the data order, the MLM masks (per sample, `sample_seed`), the shared modules' initial
  weights (the heads are built last, so they do not shift the others' draws) and the hard-negative draws' start.
- init: PatchAlign initialises its Linear layers with text_config.initializer_range; the recipe's 0.02 (BERT's)
  starts every caption's [CLS] feature at cosine 0.99996 with every other, so ITC sat at exactly ln(batch) for
  200+ steps in the pilot; `text_init_std` 0.1 (cosine 0.965) lets it move within the budget.
- training: LeanTrainer (transformers Trainer), AdamW, cosine schedule with 5% warm-up, 1 thread.
- evaluation every `eval_every` steps (and at step 0) on the 500 held-out images:
  ITC R@1 = mean of image->text and text->image R@1 of the ITC scores (`patch_align_retrieval_scores`, itm=False)
  between each image and its full listing caption ("a red circle, a blue square and a green star");
  MLM accuracy = argmax at one masked shape or colour word of that caption, the word chosen per image (fixed)
  among those the rest of the caption makes unambiguous (the colour of the only circle, the shape of the only
  red object), read through the MLM head on the text-aware path (= the full image, the detector being off).
- reported: steps to reach 90% of the same seed's `none` final score; the paired difference of the area under
  the curve (mean of the metric over the evaluations, trapezoid over steps) vs `none`, mean +- sd over seeds and
  a 95% t-interval (t(0.975, 2) = 4.303 with 3 seeds). Verdict per variant and metric: held (interval above 0),
  did not hold (interval below 0), inconclusive (interval contains 0).

Resumable: one JSON per (variant, seed) under benchmarks/results/evidence/a_semantic_losses/; a finished run is
skipped, so an interrupted set is finished by running the same command again. Runs go seed by seed, so a partial
set holds complete pairs. The report (the section of benchmarks/results/evidence.md between this experiment's
markers, and the PNG beside it) is rewritten from the JSON files after every run, or alone with --report.

    python benchmarks/evidence/semantic_losses.py                 # ~20 CPU min on 1 thread (~30 wall, shared 2 cores)
    python benchmarks/evidence/semantic_losses.py --report        # tables and plot from the JSON files
    python benchmarks/evidence/semantic_losses.py --pilot         # seconds per step and per evaluation
    python benchmarks/evidence/semantic_losses.py --variants region --seeds 1   # one run again (same numbers)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from datasets import concatenate_datasets  # noqa: E402
from transformers import TrainerCallback, set_seed  # noqa: E402

from leanvlp.data.collate import PatchAlignCollator  # noqa: E402
from leanvlp.data.pairs import to_pairs  # noqa: E402
from leanvlp.data.shapes import make_shapes_dataset  # noqa: E402
from leanvlp.evaluation import patch_align_retrieval_scores  # noqa: E402
from leanvlp.metrics import retrieval_recall  # noqa: E402
from leanvlp.modeling.configuration_patch_align import PatchAlignConfig  # noqa: E402
from leanvlp.modeling.modeling_patch_align import PatchAlignForPreTraining  # noqa: E402
from leanvlp.training import (  # noqa: E402
    CollatorEpoch,
    LeanTrainer,
    LeanTrainingArguments,
    ModelArguments,
    annotation_vocab,
    build_patch_align,
    corpus_of,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "evidence" / "a_semantic_losses"
REPORT = RESULTS / "evidence.md"
PLOT = RESULTS / "evidence_a_semantic_losses.png"
BEGIN = "<!-- experiment a: begin (written by benchmarks/evidence/semantic_losses.py) -->"
END = "<!-- experiment a: end -->"

VARIANTS = {"none": [], "class": ["object_class"], "attribute": ["attribute"], "region": ["region_feature"],
            "all": ["object_class", "attribute", "region_feature"]}
METRICS = {"itc_r1": "ITC R@1", "mlm_acc": "masked shape/colour-word accuracy"}
SETTINGS = dict(
    image_size=48, patch_size=8, vision_hidden=64, vision_layers=4, text_hidden=64, text_layers=2, fusion_layers=1,
    embed_dim=64, batch_size=32, steps=480, eval_every=60, learning_rate=1e-3, warmup=0.05, weight_decay=0.05,
    train_images=2000, eval_images=500, min_objects=3, data_seed=0, teacher_size=32, teacher_crop=8,
    teacher_seed=1234, eval_seed=7, text_init_std=0.1,
)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% t quantiles by degrees of freedom


# ----------------------------------------------------------------------------- data


def shapes_with_objects(count: int, start: int, s: dict[str, Any]) -> tuple[Any, int]:
    """`count` shapes rows with >= min_objects objects from index `start` on; returns them and the next index."""
    rows, index = [], start
    while sum(len(r) for r in rows) < count:
        chunk = make_shapes_dataset(count, image_size=s["image_size"], seed=s["data_seed"], start_index=index)
        index += count
        rows.append(chunk.filter(lambda r: len(r["boxes"]) >= s["min_objects"]))
    data = concatenate_datasets(rows)
    return data.select(range(count)), index


def teacher_matrix(s: dict[str, Any]) -> np.ndarray:
    crop = s["teacher_crop"]
    rng = np.random.default_rng(s["teacher_seed"])
    return rng.standard_normal((crop * crop * 3, s["teacher_size"])).astype(np.float32) / math.sqrt(crop * crop * 3)


def add_teacher_features(data: Any, s: dict[str, Any]) -> Any:
    """box_features: each box's crop (resized to crop x crop, RGB in [-0.5, 0.5]) times the fixed random matrix."""
    matrix, crop = teacher_matrix(s), s["teacher_crop"]

    def features(row: dict[str, Any]) -> dict[str, Any]:
        image = PIL.Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        out = []
        for x, y, w, h in row["boxes"]:
            patch = image.crop((int(x), int(y), int(math.ceil(x + w)), int(math.ceil(y + h))))
            pixels = np.asarray(patch.resize((crop, crop), PIL.Image.BILINEAR), dtype=np.float32) / 255.0 - 0.5
            out.append((pixels.reshape(-1) @ matrix).tolist())
        return {"box_features": out}

    return data.cast_column("image", ImageFeature(decode=False)).map(features)


def listing(labels: list[str], attributes: list[list[str]]) -> str:
    """The shapes set's listing caption without sizes: "a red circle, a blue square and a green star"."""
    names = [f"a {attrs[0]} {label}" for label, attrs in zip(labels, attributes)]
    return ", ".join(names[:-1]) + " and " + names[-1]


def masked_item(labels: list[str], attributes: list[list[str]], rng: np.random.Generator) -> tuple[str, str]:
    """(caption with one [MASK], the masked word): a shape whose colour is unique, or a colour whose shape is."""
    colours = [a[0] for a in attributes]
    options = [(j, "shape") for j in range(len(labels)) if colours.count(colours[j]) == 1]
    options += [(j, "colour") for j in range(len(labels)) if labels.count(labels[j]) == 1]
    j, kind = options[int(rng.integers(len(options)))]
    words = [[colours[k], labels[k]] for k in range(len(labels))]
    target = words[j][1 if kind == "shape" else 0]
    words[j][1 if kind == "shape" else 0] = "[MASK]"
    names = [f"a {c} {s}" for c, s in words]
    return ", ".join(names[:-1]) + " and " + names[-1], target


def eval_set(data: Any, s: dict[str, Any]) -> dict[str, Any]:
    images = [PIL.Image.open(io.BytesIO(r["bytes"])).convert("RGB")
              for r in data.cast_column("image", ImageFeature(decode=False))["image"]]
    texts, masked, targets = [], [], []
    for i, (labels, attrs) in enumerate(zip(data["box_labels"], data["box_attributes"])):
        texts.append(listing(labels, attrs))
        text, word = masked_item(labels, attrs, np.random.default_rng([s["eval_seed"], i]))
        masked.append(text)
        targets.append(word)
    return dict(images=images, texts=texts, masked=masked, targets=targets)


# ----------------------------------------------------------------------------- model, evaluation


def model_args(s: dict[str, Any], heads: list[str]) -> ModelArguments:
    return ModelArguments(family="patch_align", tiny_image_size=s["image_size"], tiny_patch_size=s["patch_size"],
                          tiny_vision_hidden=s["vision_hidden"], tiny_vision_layers=s["vision_layers"],
                          tiny_llm_hidden=s["text_hidden"], tiny_llm_layers=s["text_layers"],
                          fusion_layers=s["fusion_layers"], decoder_layers=1, embed_dim=s["embed_dim"],
                          semantic_heads=",".join(heads))


def build(s: dict[str, Any], heads: list[str], seed: int, train: Any) -> tuple[PatchAlignForPreTraining, Any]:
    """The recipe's tiny PatchAlign, rebuilt with the detector off and no captioning LM. Paired init: every module
    but the heads takes the weights of the head-less model built from `seed` (building a head draws random numbers
    before the model's own init, which would otherwise shift every other weight)."""
    recipe, processor = build_patch_align(model_args(s, heads), "pretrain", corpus_of(train), annotation_vocab(train))
    config = recipe.config.to_dict()
    config.update(patch_detector={"enabled": False}, loss_weights={**config["loss_weights"], "lm": 0.0},
                  text_config={**config["text_config"], "initializer_range": s["text_init_std"]})
    set_seed(seed)
    shared = PatchAlignForPreTraining(PatchAlignConfig.from_dict(
        {**config, "semantic_heads": {h: {"enabled": False} for h in VARIANTS["all"]}})).state_dict()
    set_seed(seed)
    model = PatchAlignForPreTraining(PatchAlignConfig.from_dict(config))
    missing, unexpected = model.load_state_dict(shared, strict=False)
    if unexpected or any(not k.startswith("semantic_heads.") for k in missing):
        raise RuntimeError(f"paired init: unexpected {unexpected}, missing {missing}")
    return model, processor


@torch.no_grad()
def evaluate(model: PatchAlignForPreTraining, processor: Any, items: dict[str, Any], batch_size: int = 100
             ) -> dict[str, float]:
    was_training = model.training
    model.eval()
    scores = patch_align_retrieval_scores(model, processor, items["images"], items["texts"], itm=False,
                                          batch_size=batch_size)
    recall = retrieval_recall(scores, ks=(1,))
    pa, tok, correct = model.patch_align, processor.tokenizer, 0
    for start in range(0, len(items["masked"]), batch_size):
        stop = start + batch_size
        text = tok(items["masked"][start:stop], padding=True, return_tensors="pt")
        pixels = processor.image_processor(items["images"][start:stop], return_tensors="pt")["pixel_values"]
        where = text["input_ids"] == tok.mask_token_id  # (B, T), one per row
        if not torch.equal(where.sum(1), torch.ones(where.shape[0], dtype=torch.long)):
            raise RuntimeError("every masked caption must hold exactly one [MASK]")
        encoded = pa.encode_text(text["input_ids"], text["attention_mask"])
        image = pa.encode_image(pixels, text_cls=encoded[:, 0]).aware
        logits = model.mlm_head(pa.fuse(encoded, text["attention_mask"], image))[where]  # (B, V)
        target = torch.tensor(tok.convert_tokens_to_ids(items["targets"][start:stop]))
        correct += int((logits.argmax(-1) == target).sum())
    model.train(was_training)
    return {"itc_r1": (recall["i2t_r1"] + recall["t2i_r1"]) / 2, "mlm_acc": correct / len(items["masked"])}


class EvaluateEvery(TrainerCallback):
    """Evaluates at step 0 and every `every` steps; training seconds (wall and this process's CPU) exclude the
    evaluations. On a shared machine the CPU seconds are the budget's measure; wall seconds grow with the load."""

    def __init__(self, model: Any, processor: Any, items: dict[str, Any], every: int) -> None:
        self.model, self.processor, self.items, self.every = model, processor, items, every
        self.curve: list[dict[str, float]] = []
        self.train_seconds = self.cpu_seconds = self.eval_seconds = self.eval_cpu_seconds = 0.0
        self._since = self._cpu_since = 0.0

    def _evaluate(self, step: int) -> None:
        self.train_seconds += time.perf_counter() - self._since
        self.cpu_seconds += time.process_time() - self._cpu_since
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = evaluate(self.model, self.processor, self.items)
        self.eval_seconds += time.perf_counter() - start
        self.eval_cpu_seconds += time.process_time() - cpu_start
        self.curve.append({"step": step, "train_seconds": round(self.train_seconds, 3),
                           "train_cpu_seconds": round(self.cpu_seconds, 3), **metrics})
        print(f"    step {step:4d}  {self.train_seconds:7.1f}s wall {self.cpu_seconds:7.1f}s cpu  "
              + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        self._since, self._cpu_since = time.perf_counter(), time.process_time()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._since, self._cpu_since = time.perf_counter(), time.process_time()
        self._evaluate(0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._evaluate(state.global_step)


def run(variant: str, seed: int, s: dict[str, Any], train: Any, items: dict[str, Any], steps: int | None = None
        ) -> dict[str, Any]:
    heads = VARIANTS[variant]
    model, processor = build(s, heads, seed, train)
    pairs = to_pairs(train, "pretrain", annotations=True)
    collator = PatchAlignCollator(processor, "pretrain", boxes=True, region_features="region_feature" in heads,
                                  seed=seed)
    steps = steps or s["steps"]
    evaluator = EvaluateEvery(model, processor, items, s["eval_every"])
    with tempfile.TemporaryDirectory() as out:
        args = LeanTrainingArguments(
            output_dir=out, per_device_train_batch_size=s["batch_size"], max_steps=steps,
            learning_rate=s["learning_rate"], warmup_steps=s["warmup"], weight_decay=s["weight_decay"],
            lr_scheduler_type="cosine", save_strategy="no", logging_steps=s["eval_every"], report_to=[],
            seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)
        trainer = LeanTrainer(model=model, args=args, train_dataset=pairs, data_collator=collator,
                              processing_class=processor, callbacks=[CollatorEpoch(collator), evaluator])
        trainer.train()
    losses = [{k: v for k, v in log.items() if k == "step" or "loss" in k} for log in trainer.state.log_history]
    return {"variant": variant, "heads": heads, "seed": seed, "settings": s, "curve": evaluator.curve,
            "eval_seconds": round(evaluator.eval_seconds, 1), "eval_cpu_seconds": round(evaluator.eval_cpu_seconds, 1),
            "train_losses": losses,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- analysis, report


def auc(curve: list[dict[str, float]], metric: str) -> float:
    """Trapezoid area under the metric-vs-step curve over the run's steps, divided by them (a mean score)."""
    steps = [p["step"] for p in curve]
    values = [p[metric] for p in curve]
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def steps_to(curve: list[dict[str, float]], metric: str, threshold: float) -> int | None:
    return next((p["step"] for p in curve if p[metric] >= threshold), None)


def mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean (None with fewer than 2 values)."""
    if len(values) < 2:
        return None
    half = T_975[min(len(values) - 1, 5)] * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.mean(values) - half, statistics.mean(values) + half


def verdict(bounds: tuple[float, float] | None) -> str:
    if bounds is None:
        return "inconclusive (fewer than 2 paired seeds)"
    low, high = bounds
    if low > 0:
        return "held"
    if high < 0:
        return "did not hold (slower than none)"
    return "inconclusive"


def load_runs() -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(RUNS.glob("*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["variant"], {})[record["seed"]] = record
    return runs


def blind_baselines(items: dict[str, Any]) -> dict[str, float]:
    """What an image-blind model scores: ITC R@1 at chance, MLM by always answering the most common word."""
    targets = items["targets"]
    return {"itc_r1": 1 / len(items["texts"]), "mlm_acc": max(targets.count(t) for t in set(targets)) / len(targets)}


def report(runs: dict[str, dict[int, dict[str, Any]]], blind: dict[str, float] | None = None) -> str:
    base = runs.get("none", {})
    seeds = sorted(base)
    lines = [BEGIN, "", "## (a) Semantic visual losses converge faster?", ""]
    if not seeds:
        return "\n".join(lines + ["No finished `none` run yet: nothing to compare.", "", END])
    s = base[seeds[0]]["settings"]
    lines += [
        f"Tiny PatchAlign from scratch on shapes ({s['image_size']} px, 3-4 objects per image, "
        f"{s['train_images']} training images), detector off, ITC + ITM + MLM; {s['steps']} steps of batch "
        f"{s['batch_size']}; evaluation every {s['eval_every']} steps on {s['eval_images']} held-out images; text "
        f"encoder init std {s['text_init_std']}. "
        "Region teacher: a fixed random projection of the box crop's pixels (8x8 RGB -> 32, numpy seed "
        f"{s['teacher_seed']}). Seeds: {seeds}. Paired differences are variant minus `none` on the same seed; "
        "interval: 95% t-interval of the mean over seeds. Written by `benchmarks/evidence/semantic_losses.py` "
        "from the JSON files in `benchmarks/results/evidence/a_semantic_losses/`; the plot is "
        "`evidence_a_semantic_losses.png` (mean over seeds, band = min..max).",
        "",
    ]
    if blind:
        lines += [f"Image-blind reference: ITC R@1 at chance {blind['itc_r1']:.3f}; always answering the most common "
                  f"masked word scores {blind['mlm_acc']:.3f}.", ""]
    verdicts = []
    for metric, name in METRICS.items():
        lines += [f"### {name}", "",
                  "| variant | seeds | final | steps to 90% of none's final (reached) | AUC | paired AUC diff "
                  "(mean ± sd) | 95% interval | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for variant in VARIANTS:
            got = runs.get(variant, {})
            paired = [seed for seed in seeds if seed in got]
            if not paired:
                continue
            finals = [got[k]["curve"][-1][metric] for k in paired]
            reach = [steps_to(got[k]["curve"], metric, 0.9 * base[k]["curve"][-1][metric]) for k in paired]
            reached = [float(r) for r in reach if r is not None]
            aucs = [auc(got[k]["curve"], metric) for k in paired]
            diffs = [auc(got[k]["curve"], metric) - auc(base[k]["curve"], metric) for k in paired]
            bounds = interval(diffs) if variant != "none" else None
            text = verdict(bounds) if variant != "none" else "baseline"
            if variant != "none":
                verdicts.append(f"- {variant}, {name}: {text}"
                                + (f" (paired AUC difference {statistics.mean(diffs):+.3f}, 95% interval "
                                   f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}])" if bounds else ""))
            lines.append(
                f"| {variant} | {len(paired)} | {mean_sd(finals)} | {mean_sd(reached, 0)} "
                f"({len(reached)}/{len(paired)}) "
                f"| {mean_sd(aucs)} | {mean_sd(diffs) if variant != 'none' else '-'} | "
                f"{'-' if bounds is None else f'[{bounds[0]:+.3f}, {bounds[1]:+.3f}]'} | {text} |")
        lines.append("")
    lines += ["### Cost", "", "| variant | training CPU seconds per run (1 thread) | training wall seconds (shared "
              "machine) | evaluation CPU seconds per run | parameters |", "|---|---|---|---|---|"]
    for variant in VARIANTS:
        if runs.get(variant):
            got = list(runs[variant].values())
            cpu = [r["curve"][-1]["train_cpu_seconds"] for r in got]
            wall = [r["curve"][-1]["train_seconds"] for r in got]
            evals = [r["eval_cpu_seconds"] for r in got]
            params = got[0]["num_parameters"]
            lines.append(f"| {variant} | {mean_sd(cpu, 0)} | {mean_sd(wall, 0)} | {mean_sd(evals, 0)} | {params:,} |")
    lines += ["", "### Verdicts (the claim: the variant converges faster than none, i.e. a larger AUC)", "",
              *verdicts, "", END]
    return "\n".join(lines)


def write_report(runs: dict[str, dict[int, dict[str, Any]]], blind: dict[str, float] | None = None) -> None:
    section = report(runs, blind)
    text = REPORT.read_text() if REPORT.exists() else "# Evidence that the techniques keep quality (issue #15)\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    REPORT.write_text(text)
    plot(runs)


def plot(runs: dict[str, dict[int, dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, (metric, name) in enumerate(METRICS.items()):
        for col, x_key in enumerate(("step", "train_cpu_seconds")):  # CPU: wall time follows the machine's load
            ax = axes[row][col]
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
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Experiment (a): semantic visual losses, tiny PatchAlign on shapes (mean, band = min..max)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def experiment_parser(description: str, names: Sequence[str], kind: str = "variants",
                      pilot_help: str = "time a few steps of each variant and one evaluation") -> argparse.ArgumentParser:
    """The flags every evidence script shares: which runs (`--variants` / `--arms`, `--seeds`), `--report`,
    `--pilot`, `--force`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(f"--{kind}", default=",".join(names), help=f"comma-separated among {list(names)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--report", action="store_true", help="only rewrite the tables and the plot")
    parser.add_argument("--pilot", action="store_true", help=pilot_help)
    parser.add_argument("--force", action="store_true", help="rerun finished runs too")
    return parser


def chosen_runs(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str],
                kind: str = "variants") -> tuple[list[str], list[int]]:
    """The runs asked for (an unknown name is a usage error naming it) and the seeds; one thread, as every run's
    CPU seconds assume."""
    torch.set_num_threads(1)
    picked = [v.strip() for v in getattr(args, kind).split(",") if v.strip()]
    unknown = [v for v in picked if v not in names]
    if unknown:
        parser.error(f"--{kind}: unknown {unknown}; known {list(names)}")
    return picked, [int(x) for x in args.seeds.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__.split("\n")[0], list(VARIANTS))
    args = parser.parse_args(argv)
    variants, seeds = chosen_runs(parser, args, list(VARIANTS))
    s = dict(SETTINGS)
    start = time.perf_counter()
    train, next_index = shapes_with_objects(s["train_images"], 0, s)
    held_out, _ = shapes_with_objects(s["eval_images"], next_index, s)
    items = eval_set(held_out, s)
    blind = blind_baselines(items)
    if args.report:
        write_report(load_runs(), blind)
        return 0
    train = add_teacher_features(train, s)
    print(f"data: {len(train)} training images, {len(items['texts'])} held-out, {time.perf_counter() - start:.1f}s",
          flush=True)
    if args.pilot:
        for variant in variants:
            t0 = time.perf_counter()
            record = run(variant, seeds[0], {**s, "eval_every": 10 ** 9}, train, items, steps=10)
            total = time.perf_counter() - t0
            print(f"pilot {variant}: 10 steps {record['curve'][-1]['train_seconds']:.1f}s, "
                  f"2 evaluations {record['eval_seconds']:.1f}s, run total {total:.1f}s", flush=True)
        return 0
    RUNS.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for variant in variants:
            path = RUNS / f"{variant}_seed{seed}.json"
            if path.exists() and not args.force:
                if json.loads(path.read_text())["settings"] != s:
                    raise SystemExit(f"{path} was run with other settings; delete it or pass --force")
                print(f"skip {variant} seed {seed}: {path.name} exists", flush=True)
                continue
            print(f"run {variant} seed {seed}", flush=True)
            record = run(variant, seed, s, train, items)
            path.write_text(json.dumps(record, indent=1) + "\n")
            write_report(load_runs(), blind)
    write_report(load_runs(), blind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
