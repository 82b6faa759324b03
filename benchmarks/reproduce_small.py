"""Small-scale reproduction of the seeds' claims, side by side, offline on a CPU: one command, one table.

Three experiments, each trains its variants INTERLEAVED in one process (one step of each in turn, the order
rotating every round, each step timed on its own), so a shared, noisy machine slows every variant alike:

1. MergeBridge (SimVLG) on easy-vqa: frozen DINOv2-S @112 px -> bridge initialised from MiniLM-L6 -> frozen
   SmolLM2-135M. Merged bridge (r=8: 65 -> 17 visual tokens) vs the same weights unmerged (r=0: 65 tokens),
   same data order and seed. Wall-clock per step, VQA accuracy and caption CIDEr at equal steps.
2. PatchAlign on the shapes dataset, tiny towers from scratch: semantic heads on/off x PTA pruning
   (text-aware patch detector) on/off. Loss curves, retrieval R@1 and held-out caption LM loss at a fixed
   step budget.
3. SimVLG's headline claim: MergeBridge vs a BLIP-2 Q-Former bridge trained with the LM loss only (BLIP-2
   without its first stage) on the same frozen DINOv2-S and SmolLM2, same data, same steps. transformers'
   `Blip2ForConditionalGeneration` hard-wires its own `Blip2VisionModel`, so the baseline composes
   transformers' `Blip2QFormerModel` + 32 learned queries + a linear projection into SmolLM2 (BLIP-2's
   bridge), fed with DINOv2-S features; its self-attention and query FFN start from MiniLM-L6 like
   MergeBridge's bridge (BLIP-2 starts its Q-Former from BERT), cross-attention from scratch.
   Experiments 1 and 3 share one interleaved run (MergeBridge r=8 is in both).

The frozen DINOv2-S is deterministic, so its features are computed once per image and cached; every
variant reads the same cached features. Step times therefore cover bridge + LLM forward/backward + optimizer;
the (identical) vision forward is timed separately and reported beside them.

    LEANVLP_ASSETS=/tmp/leanvlp_assets_cold python benchmarks/reproduce_small.py            # ~40 min, 2 cores
    python benchmarks/reproduce_small.py --quick                                             # ~5 min smoke run
    python benchmarks/reproduce_small.py --budget-minutes 20 --only mergebridge

Writes benchmarks/results/reproduce_small.md (+ reproduce_small.json) and PNGs beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BertModel,
    BertTokenizer,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    ViTImageProcessorPil,
)

from leanvlp import assets  # noqa: E402
from leanvlp.data.shapes import COLOURS, PLURALS, SHAPES, make_shapes_dataset  # noqa: E402
from leanvlp.metrics import caption_metrics, retrieval_recall, vqa_accuracy  # noqa: E402
from leanvlp.modeling.configuration_patch_align import PatchAlignConfig  # noqa: E402
from leanvlp.modeling.modeling_merge_bridge import MergeBridgeForConditionalGeneration  # noqa: E402
from leanvlp.modeling.modeling_patch_align import (  # noqa: E402
    PatchAlignForImageTextRetrieval,
    PatchAlignForPreTraining,
)
from leanvlp.modeling.token_merging import TokenMergingConfig  # noqa: E402
from leanvlp.processing.processing_merge_bridge import MergeBridgeProcessor  # noqa: E402
from leanvlp.processing.processing_patch_align import PatchAlignProcessor  # noqa: E402

__all__ = ["QFormerBridge", "main"]

IMAGE_SIZE = 112  # DINOv2-S/14 at 112 px: 8x8 patches + CLS = 65 tokens
MERGE_R = 8  # 65 -> 17 tokens over MiniLM's 6 layers
NUM_QUERIES = 32  # BLIP-2's query count
RESULTS = Path(__file__).resolve().parent / "results"
PNG = dict(dpi=72)  # commit-sized figures


# ----------------------------------------------------------------------------- bookkeeping


@dataclass
class Variant:
    """One trained variant: its step function, its own clock and its curves."""

    name: str
    step: Callable[[int], float]  # step index -> loss
    prepare: Callable[[int], None] = lambda index: None  # untimed work before a step (tokenising its batch)
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "seconds", metrics...}

    @property
    def train_seconds(self) -> float:
        return sum(self.step_seconds)


def run_round(variants: list[Variant], index: int) -> None:
    """One step of every variant; the order rotates each round so no variant always goes first."""
    k = index % len(variants)
    for v in variants[k:] + variants[:k]:
        v.prepare(index)
        start = time.perf_counter()
        loss = v.step(index)
        v.step_seconds.append(time.perf_counter() - start)
        v.losses.append(loss)


def smooth(values: list[float], width: int) -> list[float]:
    """Trailing moving average (curves of a few hundred noisy steps)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def time_to_reach(variant: Variant, metric: str, target: float) -> float | None:
    """Training seconds at the first evaluation where `metric` >= target (None if never)."""
    for e in variant.evals:
        if e["step"] > 0 and e[metric] >= target - 1e-9:
            return e["seconds"]
    return None


def resolved(a: float, b: float, n: int) -> bool:
    """Two accuracies over n questions differ by more than twice the standard error of their difference."""
    se = math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1))
    return abs(a - b) > 2 * se


def fmt(value: float | None, digits: int = 3) -> str:
    return "never" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- the BLIP-2 baseline bridge


class QFormerBridge(nn.Module):
    """BLIP-2's bridge: learned queries -> transformers' Q-Former (cross-attending to vision) -> Linear into the LLM."""

    def __init__(self, vision_width: int, llm_width: int, bert: BertModel, num_queries: int = NUM_QUERIES) -> None:
        super().__init__()
        bc = bert.config
        config = Blip2QFormerConfig(
            hidden_size=bc.hidden_size, num_hidden_layers=bc.num_hidden_layers,
            num_attention_heads=bc.num_attention_heads, intermediate_size=bc.intermediate_size,
            hidden_dropout_prob=bc.hidden_dropout_prob, attention_probs_dropout_prob=bc.attention_probs_dropout_prob,
            layer_norm_eps=bc.layer_norm_eps, encoder_hidden_size=vision_width, cross_attention_frequency=2,
        )
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, bc.hidden_size) * config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        self.language_projection = nn.Linear(bc.hidden_size, llm_width)
        self._load_bert(bert)

    def _load_bert(self, bert: BertModel) -> None:
        """BERT self-attention and FFN -> the Q-Former's (queries' FFN); cross-attention stays random, as in BLIP-2."""
        src = bert.state_dict()
        dst = self.qformer.state_dict()
        mapping = {"layernorm.weight": "embeddings.LayerNorm.weight", "layernorm.bias": "embeddings.LayerNorm.bias"}
        for i in range(bert.config.num_hidden_layers):
            for ours, theirs in (("attention.attention", "attention.self"), ("attention.output", "attention.output"),
                                 ("intermediate_query", "intermediate"), ("output_query", "output")):
                for key in dst:
                    prefix = f"encoder.layer.{i}.{ours}."
                    if key.startswith(prefix):
                        mapping[key] = f"encoder.layer.{i}.{theirs}.{key[len(prefix):]}"
        missing = [theirs for theirs in mapping.values() if theirs not in src]
        if missing:
            raise ValueError(f"QFormerBridge: the BERT checkpoint lacks {missing[:3]}")
        self.qformer.load_state_dict({k: src[v] for k, v in mapping.items()}, strict=False)
        self.loaded_from_bert = len(mapping)

    def forward(self, vision_tokens: Tensor) -> Tensor:
        queries = self.query_tokens.expand(vision_tokens.shape[0], -1, -1)  # (B, Q, Cq)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=vision_tokens).last_hidden_state
        return self.language_projection(out)  # (B, Q, C_llm)


# ----------------------------------------------------------------------------- experiments 1 + 3: easy-vqa


def easy_vqa_samples(rows: list[dict], count: int, seed: int, batch_size: int) -> list[tuple[int, str, str, str]]:
    """A fixed stream of (image index, task, question, target): caption and VQA batches alternate (1:1 mix;
    one task per batch keeps its sequences of similar length, so little compute goes to padding)."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        i = rng.randrange(len(rows))
        if (n // batch_size) % 2 == 0:
            out.append((i, "caption", "", rows[i]["captions"][0]))
        else:
            q = rng.randrange(len(rows[i]["questions"]))
            out.append((i, "vqa", rows[i]["questions"][q], rows[i]["answers"][q][0]))
    return out


@torch.no_grad()
def vision_features(model: MergeBridgeForConditionalGeneration, processor: MergeBridgeProcessor, images: list,
                    batch_size: int = 32) -> tuple[Tensor, float]:
    """Frozen DINOv2-S tokens the bridge reads for every image (N, 65, 384), and seconds per image of that forward."""
    model.eval()
    chunks, start = [], time.perf_counter()
    for s in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[s:s + batch_size], return_tensors="pt")["pixel_values"]
        chunks.append(model.get_image_features(pixels).last_hidden_state)  # the config's vision_feature_layer
    return torch.cat(chunks), (time.perf_counter() - start) / max(len(images), 1)


def frozen_llm(llm_dir: str | Path, model: MergeBridgeForConditionalGeneration) -> nn.Module:
    """The frozen causal LM the bridges share, with `model`'s vocabulary (its added `<image>` row): the plain
    checkpoint has no row for `<image>`, and left trainable every step would build weight gradients for nothing."""
    llm = AutoModelForCausalLM.from_pretrained(str(llm_dir)).eval()
    llm.requires_grad_(False)  # frozen: the backward pass computes input gradients only
    with torch.no_grad():  # the head is tied, so it follows
        llm.resize_token_embeddings(model.get_input_embeddings().num_embeddings)
        llm.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
    if llm.get_output_embeddings().weight is not llm.get_input_embeddings().weight:
        raise RuntimeError("the shared LLM's head must be tied to its input embeddings (SmolLM2's is)")
    return llm


class PrefixLM:
    """A trainable bridge in front of the shared frozen LLM: visual prefix -> `<image>` slots -> loss / generate."""

    def __init__(self, name: str, bridge: Callable[[Tensor], Tensor], params: list[nn.Parameter],
                 modules: list[nn.Module], processor: MergeBridgeProcessor, llm: nn.Module, image_token_id: int,
                 lr: float, warmup: int) -> None:
        self.name, self.bridge, self.modules, self.processor, self.llm = name, bridge, modules, processor, llm
        self.image_token_id = image_token_id
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))

    def embeds(self, input_ids: Tensor, vision: Tensor) -> Tensor:
        prefix = self.bridge(vision)  # (B, M, C)
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, L, C)
        mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        if int(mask[..., 0].sum()) != prefix.shape[0] * prefix.shape[1]:
            raise ValueError(f"{self.name}: {int(mask[..., 0].sum())} <image> slots for a {tuple(prefix.shape)} prefix")
        return embeds.masked_scatter(mask, prefix.to(embeds.dtype))

    def loss(self, batch: dict[str, Tensor], vision: Tensor) -> Tensor:
        """The LLM's shifted next-token loss, with the LM head applied only where a label is (the same value as
        `LlamaForCausalLM(labels=...)`, without projecting ~30 prompt positions per row onto 49k words)."""
        hidden = self.llm.model(inputs_embeds=self.embeds(batch["input_ids"], vision),
                                attention_mask=batch["attention_mask"]).last_hidden_state  # (B, L, C)
        labels = batch["labels"][:, 1:]
        keep = labels != -100  # (B, L-1)
        logits = self.llm.lm_head(hidden[:, :-1][keep])  # (T, V)
        return F.cross_entropy(logits.float(), labels[keep])

    def train_step(self, batch: dict[str, Tensor], vision: Tensor) -> float:
        for m in self.modules:
            m.train()
        loss = self.loss(batch, vision)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def generate(self, prompts: list[str], images: list, vision: Tensor, max_new_tokens: int) -> list[str]:
        for m in self.modules:
            m.eval()
        tok = self.processor.tokenizer
        batch = self.processor(images=images, text=prompts)  # left-padded, `<image>` slots expanded
        out = self.llm.generate(inputs_embeds=self.embeds(batch["input_ids"], vision),
                                attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
                                do_sample=False, suppress_tokens=[self.image_token_id],
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def tokenize(processor: MergeBridgeProcessor, samples: list[tuple[int, str, str, str]], images: list) -> dict[str, Tensor]:
    """Right-padded ids + labels (the pixels the processor also returns are unused: features are cached)."""
    prompts = [processor.build_prompt("vqa", question=q) if task == "vqa" else processor.build_prompt("caption")
               for _, task, q, _ in samples]
    return dict(processor(images=images, text=prompts, targets=[t for *_, t in samples]))


def evaluate_prefix_lm(lm: PrefixLM, eval_set: dict[str, Any], batch_size: int) -> dict[str, float]:
    """Greedy captions (CIDEr) and short answers (VQA accuracy) on held-out easy-vqa images."""
    p = lm.processor
    captions: list[str] = []
    for s in range(0, len(eval_set["cap_refs"]), batch_size):
        idx = eval_set["cap_images"][s:s + batch_size]
        images = [eval_set["images"][i] for i in idx]
        captions += lm.generate([p.build_prompt("caption")] * len(idx), images, eval_set["features"][idx], 5)
    answers: list[str] = []
    for s in range(0, len(eval_set["vqa_refs"]), batch_size):
        idx = eval_set["vqa_images"][s:s + batch_size]
        qs = eval_set["vqa_questions"][s:s + batch_size]
        images = [eval_set["images"][i] for i in idx]
        answers += lm.generate([p.build_prompt("vqa", question=q) for q in qs], images, eval_set["features"][idx], 3)
    return {"cider": caption_metrics(captions, eval_set["cap_refs"])["cider"],
            "vqa_accuracy": vqa_accuracy(answers, eval_set["vqa_refs"]),
            "example_caption": captions[0], "example_answer": answers[0]}


def constant_baselines(train_rows: list[dict], eval_set: dict[str, Any]) -> dict[str, Any]:
    """What a bridge that ignores the image scores: the most common training answer / caption, always."""
    answer = Counter(a[0] for r in train_rows for a in r["answers"]).most_common(1)[0][0]
    caption = Counter(r["captions"][0] for r in train_rows).most_common(1)[0][0]
    return {"answer": answer, "vqa_accuracy": vqa_accuracy([answer] * len(eval_set["vqa_refs"]), eval_set["vqa_refs"]),
            "caption": caption,
            "cider": caption_metrics([caption] * len(eval_set["cap_refs"]), eval_set["cap_refs"])["cider"]}


def easy_vqa_experiment(args: argparse.Namespace, budget_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Experiments 1 and 3 in one interleaved run: MergeBridge r=8, MergeBridge r=0, BLIP-2 Q-Former bridge."""
    setup_start = time.perf_counter()
    vision_dir = assets.prepare_dinov2_small(image_size=IMAGE_SIZE)
    llm_dir, bert_dir = assets.prepare_smollm2(), assets.prepare_minilm()
    torch.manual_seed(args.seed)
    model = MergeBridgeForConditionalGeneration.from_vision_text_pretrained(
        str(vision_dir), str(llm_dir), bridge_init=str(bert_dir), bridge_merging={"r": MERGE_R},
        freeze_vision=True, freeze_llm=True)
    image_token_id = model.config.image_token_id
    llm = frozen_llm(llm_dir, model)  # the same frozen weights, with its LM head and the `<image>` row
    procs = {n: MergeBridgeProcessor.from_vision_text_pretrained(str(vision_dir), str(llm_dir), num_image_tokens=k)
             for n, k in (("merged", model.config.num_image_tokens), ("unmerged", model.config.num_bridge_input_tokens),
                          ("qformer", NUM_QUERIES))}
    assert all(p.image_token_id == image_token_id for p in procs.values())

    train_rows = list(assets.load_easy_vqa("train", limit=args.train_images))
    test_rows = list(assets.load_easy_vqa("test", limit=args.eval_images))
    train_feats, vision_s_per_image = vision_features(model, procs["merged"], [r["image"] for r in train_rows])
    test_feats, _ = vision_features(model, procs["merged"], [r["image"] for r in test_rows])
    log(f"easy-vqa: {len(train_rows)} train / {len(test_rows)} test images; DINOv2-S forward "
        f"{1000 * vision_s_per_image:.1f} ms/image (cached)")

    # Variants: the r=0 bridge is a copy of the r=8 bridge's weights with merging switched off.
    merged_bridge = model.bridge
    unmerged_bridge = copy.deepcopy(merged_bridge)
    unmerged_bridge.encoder.merging = TokenMergingConfig(r=0, mode=merged_bridge.encoder.merging.mode,
                                                         prop_attn=merged_bridge.encoder.merging.prop_attn)
    torch.manual_seed(args.seed)
    qformer = QFormerBridge(model.config.vision_config.hidden_size, llm.config.hidden_size,
                            BertModel.from_pretrained(str(bert_dir)))
    bridges = {"merged": merged_bridge, "unmerged": unmerged_bridge, "qformer": qformer}
    labels = {"merged": f"MergeBridge r={MERGE_R} ({model.config.num_image_tokens} tokens)",
              "unmerged": f"MergeBridge r=0 ({model.config.num_bridge_input_tokens} tokens)",
              "qformer": f"Q-Former bridge ({NUM_QUERIES} queries)"}
    lms = {}
    for name, module in bridges.items():
        fn = (lambda m: (lambda v: m(v)[0]))(module) if name != "qformer" else module
        lms[name] = PrefixLM(name, fn, [p for p in module.parameters() if p.requires_grad], [module], procs[name], llm,
                             image_token_id, args.lr, args.warmup)
    # The cached-feature path (and the label-only LM head) must equal the library's own forward from pixels.
    check = easy_vqa_samples(train_rows, 2, args.seed + 1, 1)
    batch = procs["merged"](images=[train_rows[i]["image"] for i, *_ in check],
                            text=[procs["merged"].build_prompt("vqa", question=q) if t == "vqa" else
                                  procs["merged"].build_prompt("caption") for _, t, q, _ in check],
                            targets=[t for *_, t in check])
    model.eval()
    with torch.no_grad():
        library_loss = float(model(**batch).loss)
        cached_loss = float(lms["merged"].loss(dict(batch), train_feats[[i for i, *_ in check]]))
    if abs(library_loss - cached_loss) > 1e-4:
        raise RuntimeError(f"cached-feature path disagrees with MergeBridge.forward: {cached_loss} vs {library_loss}")
    log(f"check: MergeBridge.forward loss {library_loss:.5f} == cached-feature path {cached_loss:.5f}")

    trainable = {n: sum(p.numel() for p in lm.params) for n, lm in lms.items()}

    samples = easy_vqa_samples(train_rows, args.batch_size * (args.max_steps + 1), args.seed, args.batch_size)
    rng = random.Random(args.seed + 2)
    eval_set: dict[str, Any] = {"features": test_feats, "images": [r["image"] for r in test_rows], "cap_images": list(range(len(test_rows))),
                                "cap_refs": [r["captions"] for r in test_rows], "vqa_images": [], "vqa_questions": [],
                                "vqa_refs": []}
    for i, row in enumerate(test_rows):
        for q in rng.sample(range(len(row["questions"])), min(args.questions_per_image, len(row["questions"]))):
            eval_set["vqa_images"].append(i)
            eval_set["vqa_questions"].append(row["questions"][q])
            eval_set["vqa_refs"].append(row["answers"][q])

    tokenized: dict[str, dict[int, dict[str, Tensor]]] = {n: {} for n in lms}

    def chunk(index: int) -> list[tuple[int, str, str, str]]:
        return samples[index * args.batch_size:(index + 1) * args.batch_size]

    def make_prepare(name: str) -> Callable[[int], None]:
        def prepare(index: int) -> None:
            images = [train_rows[i]["image"] for i, *_ in chunk(index)]
            tokenized[name] = {index: tokenize(procs[name], chunk(index), images)}  # keep only the current batch
        return prepare

    def make_step(name: str) -> Callable[[int], float]:
        return lambda index: lms[name].train_step(tokenized[name][index], train_feats[[i for i, *_ in chunk(index)]])

    variants = {n: Variant(n, make_step(n), make_prepare(n)) for n in lms}
    order = [variants[n] for n in ("merged", "unmerged", "qformer")]
    eval_seconds: list[float] = []

    def evaluate(step_index: int) -> None:
        start = time.perf_counter()
        for v in order:
            report = evaluate_prefix_lm(lms[v.name], eval_set, args.eval_batch_size)
            v.evals.append({"step": step_index, "seconds": v.train_seconds, **report})
        eval_seconds.append(time.perf_counter() - start)
        log(f"  step {step_index}: " + "; ".join(
            f"{v.name} vqa={v.evals[-1]['vqa_accuracy']:.3f} cider={v.evals[-1]['cider']:.3f} "
            f"loss={statistics.fmean(v.losses[-10:]) if v.losses else float('nan'):.3f}" for v in order)
            + f" [eval {eval_seconds[-1]:.0f}s]")

    def round_seconds() -> float:
        return sum(statistics.median(v.step_seconds[-10:]) for v in order)

    evaluate(0)
    torch.manual_seed(args.seed)
    done = 0
    for _ in range(2):  # calibration
        run_round(order, done)
        done += 1
    for k in range(args.num_evals):  # re-plan before each stretch with the measured round and eval times
        evals_left = args.num_evals - k
        remaining = budget_s - (time.perf_counter() - setup_start) - evals_left * statistics.fmean(eval_seconds) * 1.1
        steps_left = max(evals_left, int(remaining / (round_seconds() * 1.05)))
        target = min(args.max_steps, done + max(1, steps_left // evals_left))
        log(f"easy-vqa: {round_seconds():.2f} s per round of 3 steps; next evaluation at step {target} "
            f"(about {done + steps_left} steps in all)")
        while done < target:
            run_round(order, done)
            done += 1
            if done % 10 == 0:
                log(f"  step {done}: " + "; ".join(f"{v.name} loss={statistics.fmean(v.losses[-10:]):.3f}"
                                                  for v in order))
        evaluate(done)
        if done >= args.max_steps:
            break
    steps = done
    return {"variants": order, "labels": labels, "trainable": trainable, "steps": steps,
            "vision_ms_per_image": 1000 * vision_s_per_image, "check": (library_loss, cached_loss),
            "train_images": len(train_rows), "test_images": len(test_rows), "vqa_questions": len(eval_set["vqa_refs"]),
            "baselines": constant_baselines(train_rows, eval_set),
            "qformer_bert_tensors": qformer.loaded_from_bert, "eval_seconds": eval_seconds}


# ----------------------------------------------------------------------------- experiment 2: PatchAlign on shapes

WORDS = "a an the and of on is are there to left right above below small large"
SHAPES_VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", ","] + sorted(
    set(WORDS.split()) | set(SHAPES) | set(PLURALS.values()) | set(COLOURS))
PATCH_ALIGN_VARIANTS = {  # name -> (detector + PTA on, semantic heads on)
    "pta+heads": (True, True),
    "pta": (True, False),
    "heads": (False, True),
    "neither": (False, False),
}


def patch_align_config(detector: bool, heads: bool) -> PatchAlignConfig:
    """Tiny towers from scratch (as in tests/test_patch_align*.py): ViT 64 px / 8 px patches, 2-layer BERT."""
    on = dict(enabled=True)
    return PatchAlignConfig(
        vision_config=dict(model_type="vit", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=128, image_size=64, patch_size=8),
        text_config=dict(model_type="bert", vocab_size=len(SHAPES_VOCAB), hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128, max_position_embeddings=64),
        num_fusion_layers=1, num_decoder_layers=1, embed_dim=32,
        patch_detector=dict(enabled=detector, layer=2, keep_ratio=0.5),
        semantic_heads=dict(object_class=on, attribute=on) if heads else None,
        object_classes=list(SHAPES), attributes=list(COLOURS) + ["small", "large"],
        cls_token_id=1, sep_token_id=2, mask_token_id=3,
    )


def shapes_processor(folder: Path) -> PatchAlignProcessor:
    (folder / "vocab.txt").write_text("\n".join(SHAPES_VOCAB))
    return PatchAlignProcessor(ViTImageProcessorPil(size={"height": 64, "width": 64}),
                               BertTokenizer(str(folder / "vocab.txt")), patch_size=8,
                               object_classes=list(SHAPES), attributes=list(COLOURS) + ["small", "large"],
                               synonyms={s: [p] for s, p in PLURALS.items()})


def shapes_batch(processor: PatchAlignProcessor, ds: Any) -> dict[str, Tensor]:
    """Every target the variants may use (boxes -> PTA labels, classes, attributes); each reads what it needs."""
    captions = [c[0] for c in ds["captions"]]
    return dict(processor(images=list(ds["image"]), text=captions, boxes=ds["boxes"], box_labels=ds["box_labels"],
                          box_attributes=ds["box_attributes"]))


@torch.no_grad()
def evaluate_patch_align(model: PatchAlignForPreTraining, data: dict[str, Tensor], folder: Path) -> dict[str, float]:
    """Held-out ITC R@1, ITM-reranked R@1 (all pairs) and the caption LM loss (decoder on the image tokens)."""
    model.eval()
    model.save_pretrained(folder)
    retrieval = PatchAlignForImageTextRetrieval.from_pretrained(folder).eval()
    inputs = {k: data[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    n = inputs["input_ids"].shape[0]
    scores = retrieval(**inputs, k=n)
    itc = retrieval_recall(scores.itc_scores, ks=(1,))
    target = torch.arange(n)
    torch.manual_seed(0)  # MLM masking inside the pretraining forward
    out = model(**data)
    model.train()
    return {"itc_i2t_r1": itc["i2t_r1"], "itc_t2i_r1": itc["t2i_r1"],
            "itm_i2t_r1": float((scores.i2t_scores.argmax(1) == target).float().mean()),
            "itm_t2i_r1": float((scores.t2i_scores.argmax(1) == target).float().mean()),
            "lm_loss": float(out.loss_lm), "itc_loss": float(out.loss_itc)}


def patch_align_experiment(args: argparse.Namespace, budget_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="reproduce_small_pa_"))
    processor = shapes_processor(folder)
    train = make_shapes_dataset(args.shapes_train, image_size=64, seed=args.seed)
    held = make_shapes_dataset(args.shapes_eval * 2, image_size=64, seed=args.seed, start_index=args.shapes_train)
    seen, keep = set(), []
    for i, caps in enumerate(held["captions"]):  # unique captions: R@1 then has exactly one right answer
        if caps[0] not in seen and len(keep) < args.shapes_eval:
            seen.add(caps[0])
            keep.append(i)
    held = held.select(keep)
    train_data, eval_data = shapes_batch(processor, train), shapes_batch(processor, held)
    models, variants = {}, []
    for name, (detector, heads) in PATCH_ALIGN_VARIANTS.items():
        torch.manual_seed(args.seed)  # same init for the shared parts
        models[name] = PatchAlignForPreTraining(patch_align_config(detector, heads))
        models[name].train()
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=args.pa_lr) for n, m in models.items()}
    parts: dict[str, dict[str, list[float]]] = {n: {"itc": [], "lm": [], "pta": []} for n in models}
    n_train = train_data["input_ids"].shape[0]
    order = torch.randperm(n_train * 1000, generator=torch.Generator().manual_seed(args.seed)) % n_train

    def make_step(name: str) -> Callable[[int], float]:
        def step(index: int) -> float:
            idx = order[index * args.pa_batch_size:(index + 1) * args.pa_batch_size]
            torch.manual_seed(args.seed + index)  # same MLM masks / hard negatives draw for every variant
            out = models[name](**{k: v[idx] for k, v in train_data.items()})
            out.loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            for part in parts[name]:
                value = getattr(out, f"loss_{part}", None)
                if value is not None:
                    parts[name][part].append(value.item())
            return out.loss.item()
        return step

    variants = [Variant(n, make_step(n)) for n in models]
    for i in range(3):  # calibration (the first steps pay one-off costs)
        run_round(variants, i)
    round_s = sum(statistics.median(v.step_seconds) for v in variants)
    steps = max(3, min(args.pa_max_steps, int((budget_s - (time.perf_counter() - start) - 20) / (round_s * 1.1))))
    log(f"PatchAlign: {round_s:.2f} s per round of 4 steps; training {steps} steps per variant")
    for i in range(3, steps):
        run_round(variants, i)
        if (i + 1) % 100 == 0:
            log(f"  step {i + 1}: " + "; ".join(f"{v.name} lm={statistics.fmean(parts[v.name]['lm'][-50:]):.3f}"
                                               for v in variants))
    for v in variants:
        v.evals.append({"step": steps, "seconds": v.train_seconds,
                        **evaluate_patch_align(models[v.name], eval_data, folder / v.name)})
    return {"variants": variants, "parts": parts, "steps": steps, "train_images": n_train,
            "eval_images": eval_data["input_ids"].shape[0]}


# ----------------------------------------------------------------------------- plots and the markdown report


def plot_easy_vqa(result: dict[str, Any], out: Path) -> list[str]:
    variants, labels = result["variants"], result["labels"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = max(5, result["steps"] // 20)
    for v in variants:
        ax.plot(range(1, len(v.losses) + 1), smooth(v.losses, width), label=labels[v.name])
    ax.set(xlabel="training step (batch %d)" % result["batch_size"], ylabel=f"LM loss (moving avg {width})",
           title="easy-vqa: bridge training loss (frozen DINOv2-S + SmolLM2)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reproduce_small_easyvqa_loss.png", **PNG)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, title in ((axes[0], "vqa_accuracy", "VQA accuracy"), (axes[1], "cider", "caption CIDEr")):
        for v in variants:
            ax.plot([e["seconds"] / 60 for e in v.evals], [e[metric] for e in v.evals], marker="o", label=labels[v.name])
        ax.set(xlabel="training wall-clock of the variant (min)", ylabel=title, title=f"easy-vqa test: {title}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reproduce_small_easyvqa_vs_time.png", **PNG)
    plt.close(fig)
    return ["reproduce_small_easyvqa_loss.png", "reproduce_small_easyvqa_vs_time.png"]


def plot_patch_align(result: dict[str, Any], out: Path) -> list[str]:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    width = max(5, result["steps"] // 20)
    for ax, part in zip(axes, ("itc", "lm", "pta")):
        for v in result["variants"]:
            values = result["parts"][v.name][part]
            if values:
                ax.plot(range(1, len(values) + 1), smooth(values, width), label=v.name)
        ax.set(xlabel="step", ylabel=f"{part.upper()} loss (moving avg {width})", title=f"PatchAlign shapes: {part.upper()}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reproduce_small_patchalign_loss.png", **PNG)
    plt.close(fig)
    return ["reproduce_small_patchalign_loss.png"]


def easy_vqa_tables(result: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    v = {x.name: x for x in result["variants"]}
    labels, vis = result["labels"], result["vision_ms_per_image"] * result["batch_size"]
    med = {n: 1000 * statistics.median(x.step_seconds) for n, x in v.items()}
    lines = [
        "### 1. MergeBridge: merged (r=8) vs unmerged (r=0) bridge, easy-vqa",
        "",
        f"Frozen DINOv2-S/14 @112 px (65 tokens) -> bridge initialised from all-MiniLM-L6-v2 (6 layers) -> frozen "
        f"SmolLM2-135M. Same initial weights, same {result['steps']} steps of batch {result['batch_size']} "
        f"(captions and VQA pairs mixed 1:1 from {result['train_images']} train images), same order, lr "
        f"{result['lr']}; evaluated on {result['test_images']} test images ({result['test_images']} captions, "
        f"{result['vqa_questions']} questions, greedy decoding).",
        "",
        "| bridge | LLM visual tokens | trainable params | median step (ms) | + vision fwd (ms) | total train (s) "
        "| VQA acc | caption CIDEr | final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in ("merged", "unmerged"):
        e = v[n].evals[-1]
        lines.append(f"| {labels[n]} | {labels[n].split('(')[1].split()[0]} | {result['trainable'][n] / 1e6:.2f} M "
                     f"| {med[n]:.0f} | {med[n] + vis:.0f} | {v[n].train_seconds:.0f} | {e['vqa_accuracy']:.3f} "
                     f"| {e['cider']:.3f} | {statistics.fmean(v[n].losses[-20:]):.3f} |")
    speed = v["unmerged"].train_seconds / v["merged"].train_seconds
    speed_full = (med["unmerged"] + vis) / (med["merged"] + vis)
    base = result["baselines"]
    lines += ["", f"Image-blind baselines on the same questions: always answering \"{base['answer']}\" scores VQA "
              f"{base['vqa_accuracy']:.3f}; always captioning \"{base['caption']}\" scores CIDEr {base['cider']:.3f}."]
    lines += ["", f"Speedup of the merged bridge: **{speed:.2f}x** per training step (bridge + LLM, summed step times), "
              f"{speed_full:.2f}x counting the shared DINOv2-S forward ({vis:.0f} ms per batch, measured once and "
              "cached for all variants)."]
    return lines, {"speedup": speed, "speedup_with_vision": speed_full, "median_ms": med}


def blip2_table(result: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    v = {x.name: x for x in result["variants"]}
    labels = result["labels"]
    lines = [
        "### 3. SimVLG's claim: MergeBridge vs a BLIP-2 Q-Former bridge (LM loss only), easy-vqa",
        "",
        "Baseline: transformers' `Blip2QFormerModel` (6 layers, width 384, cross-attention every 2nd layer, as "
        f"BLIP-2) + {NUM_QUERIES} learned query tokens + a Linear into SmolLM2 — exactly BLIP-2's bridge — fed with "
        "the same frozen DINOv2-S features (transformers' `Blip2ForConditionalGeneration` hard-wires its own "
        "`Blip2VisionModel`, so it is composed from its parts). Its self-attention and query FFN start from "
        "MiniLM-L6 like MergeBridge's bridge; cross-attention and queries from scratch. No first stage "
        "(ITC/ITM/ITG): LM loss only. Same data, order, steps, optimizer and lr as experiment 1.",
        "",
        "| bridge | LLM visual tokens | trainable params | median step (ms) | total train (s) | VQA acc | CIDEr "
        "| best VQA | best CIDEr | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in ("merged", "qformer"):
        e = v[n].evals[-1]
        lines.append(f"| {labels[n]} | {labels[n].split('(')[1].split()[0]} | {result['trainable'][n] / 1e6:.2f} M "
                     f"| {1000 * statistics.median(v[n].step_seconds):.0f} | {v[n].train_seconds:.0f} "
                     f"| {e['vqa_accuracy']:.3f} | {e['cider']:.3f} "
                     f"| {max(x['vqa_accuracy'] for x in v[n].evals):.3f} | {max(x['cider'] for x in v[n].evals):.3f} "
                     f"| {statistics.fmean(v[n].losses[-20:]):.3f} |")
    reach: dict[str, Any] = {}
    lines += ["", "| target (the lower of the two bests after training) | MergeBridge reaches it after (s) "
              "| Q-Former reaches it after (s) | ratio (Q-Former / MergeBridge) |", "|---|---|---|---|"]
    for metric, name in (("vqa_accuracy", "VQA acc"), ("cider", "CIDEr")):
        target = min(max(x[metric] for x in v[n].evals if x["step"] > 0) for n in ("merged", "qformer"))
        tm, tq = time_to_reach(v["merged"], metric, target), time_to_reach(v["qformer"], metric, target)
        ratio = f"{tq / tm:.1f}x" if tm and tq else "n/a"
        reach[metric] = (target, tm, tq)
        lines.append(f"| {name} >= {target:.3f} | {fmt(tm, 0)} | {fmt(tq, 0)} | {ratio} |")
    evals = " / ".join(str(e["step"]) for e in v["merged"].evals)
    lines += ["", f"Evaluations at steps {evals}; times are each variant's own summed training-step seconds "
              "(evaluation excluded), so a time is only resolved to the evaluation grid."]
    trajectory = ["", "| step | " + " | ".join(f"{labels[n]} VQA / CIDEr" for n in ("merged", "unmerged", "qformer"))
                  + " |", "|---|---|---|---|"]
    for k in range(len(v["merged"].evals)):
        trajectory.append(f"| {v['merged'].evals[k]['step']} | " + " | ".join(
            f"{v[n].evals[k]['vqa_accuracy']:.3f} / {v[n].evals[k]['cider']:.3f}" for n in ("merged", "unmerged", "qformer"))
            + " |")
    lines += ["", "All three easy-vqa variants at every evaluation:"] + trajectory
    return lines, reach


def patch_align_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "### 2. PatchAlign on shapes: PTA pruning (text-aware patch detector) x semantic heads",
        "",
        f"Tiny towers from scratch (ViT 4x64 @64 px / 8 px patches, BERT 2x64, 1 fusion + 1 decoder layer), "
        f"all objectives (ITC, ITM, MLM, LM; + PTA when the detector is on: keeps 50% of the patches after block 2; "
        f"+ object-class and attribute heads when on), {result['steps']} steps of batch {result['batch_size']} from "
        f"{result['train_images']} images, same seed and batches; held-out {result['eval_images']} images with "
        "unique captions (R@1 over all of them; ITM re-ranks every pair).",
        "",
        "| variant | PTA pruning | semantic heads | median step (ms) | ITC R@1 i2t / t2i | ITM R@1 i2t / t2i "
        "| held-out LM loss | held-out ITC loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        e, (det, heads) = v.evals[-1], PATCH_ALIGN_VARIANTS[v.name]
        lines.append(f"| {v.name} | {'on' if det else 'off'} | {'on' if heads else 'off'} "
                     f"| {1000 * statistics.median(v.step_seconds):.0f} | {e['itc_i2t_r1']:.3f} / {e['itc_t2i_r1']:.3f} "
                     f"| {e['itm_i2t_r1']:.3f} / {e['itm_t2i_r1']:.3f} | {e['lm_loss']:.3f} | {e['itc_loss']:.3f} |")
    return lines


def notes(easy: dict[str, Any] | None, speed: dict[str, Any] | None, reach: dict[str, Any] | None,
          pa: dict[str, Any] | None) -> list[str]:
    """Plain statements derived from the numbers above (no claim is asserted that the run did not show)."""
    out = ["### Where the claims held at this scale", ""]
    if easy is not None:
        v = {x.name: x for x in easy["variants"]}
        m, u = v["merged"].evals[-1], v["unmerged"].evals[-1]
        n_q, base = easy["vqa_questions"], easy["baselines"]
        accuracy_note = ("Accuracy: merged and unmerged do not differ by more than twice the standard error of "
                         f"{n_q} questions (VQA), so merging's accuracy cost is not resolved at this scale."
                         if not resolved(m["vqa_accuracy"], u["vqa_accuracy"], n_q) else
                         "Accuracy: the VQA difference exceeds twice its standard error "
                         + ("in favour of merging." if m["vqa_accuracy"] > u["vqa_accuracy"] else
                            "against merging: merging cost accuracy at this budget."))
        out.append(f"- **Merged vs unmerged bridge (SimVLG / EVLGen: merging cuts cost at little accuracy loss).** "
                   f"Step speedup {speed['speedup']:.2f}x ({speed['speedup_with_vision']:.2f}x with the vision "
                   f"forward); at equal steps VQA {m['vqa_accuracy']:.3f} vs {u['vqa_accuracy']:.3f}, CIDEr "
                   f"{m['cider']:.3f} vs {u['cider']:.3f}, final training loss "
                   f"{statistics.fmean(v['merged'].losses[-20:]):.3f} vs "
                   f"{statistics.fmean(v['unmerged'].losses[-20:]):.3f} (merged vs unmerged). "
                   + ("The speed claim holds. " if speed["speedup"] > 1.2 else "No material speedup here. ")
                   + accuracy_note)
        q = v["qformer"]
        first_q = statistics.fmean(q.losses[:max(1, len(q.losses) // 10)])
        last_q, last_m = statistics.fmean(q.losses[-20:]), statistics.fmean(v["merged"].losses[-20:])
        half_q = statistics.fmean(q.losses[len(q.losses) // 2 - 10:len(q.losses) // 2 + 10]) if len(q.losses) > 40 else last_q
        stalled = last_q > 1.5 * last_m and (half_q - last_q) < 0.1 * half_q
        tv, tc = reach["vqa_accuracy"], reach["cider"]
        out.append(f"- **MergeBridge vs Q-Former without its first stage (SimVLG's headline).** Q-Former loss "
                   f"{first_q:.3f} (first 10%) -> {half_q:.3f} (midway) -> {last_q:.3f} (end) vs MergeBridge "
                   f"{last_m:.3f} at the end. "
                   + ("The Q-Former loss plateaus well above MergeBridge's: it stalls, as the paper reports "
                      if stalled else "The Q-Former does not stall in the paper's sense at this budget ")
                   + "(criterion: final loss > 1.5x MergeBridge's and < 10% lower than midway). "
                   + f"Time to the common VQA target {tv[0]:.3f}: MergeBridge {fmt(tv[1], 0)} s, Q-Former "
                   f"{fmt(tv[2], 0)} s; to the common CIDEr target {tc[0]:.3f}: {fmt(tc[1], 0)} s vs {fmt(tc[2], 0)} s.")
        best_vqa = max(x.evals[-1]["vqa_accuracy"] for x in v.values())
        learned = resolved(best_vqa, base["vqa_accuracy"], n_q) and best_vqa > base["vqa_accuracy"]
        out.append(f"- Scale caveats: {easy['steps']} steps of {easy['batch_size']} on a shared 2-core CPU, against "
                   "the papers' millions of pairs. "
                   + ("At least one bridge beats the image-blind VQA baseline by more than twice the standard error."
                      if learned else
                      f"No bridge beats the image-blind VQA baseline ({base['vqa_accuracy']:.3f}) by more than twice "
                      "the standard error yet, and the greedy captions are mostly one fixed phrase per checkpoint "
                      "(CIDEr jumps between evaluations): the bridges have not yet learned to read the image, so the "
                      "accuracy and time-to-target comparisons are not resolved at this budget; the step times and "
                      "the loss curves are the measured part.")
                   + " The Q-Former here is MiniLM-sized (6x384), not BERT-base.")
    if pa is not None:
        e = {v.name: v.evals[-1] for v in pa["variants"]}
        ms = {v.name: 1000 * statistics.median(v.step_seconds) for v in pa["variants"]}
        r1 = {n: (x["itc_i2t_r1"] + x["itc_t2i_r1"]) / 2 for n, x in e.items()}
        out.append(f"- **PatchAlign (COPA's text-aware pruning; semantic heads).** Mean ITC R@1 "
                   f"(chance {1 / pa['eval_images']:.3f}): "
                   + ", ".join(f"{n} {r1[n]:.3f}" for n in PATCH_ALIGN_VARIANTS)
                   + f". Step time with pruning {ms['pta']:.0f} ms vs without {ms['neither']:.0f} ms. "
                   + ("Pruning half the patches kept retrieval at least on par "
                      if r1["pta"] >= r1["neither"] - 0.05 else "Pruning half the patches lowered retrieval ")
                   + "(the paper's claim is accuracy kept at lower cost); the semantic heads "
                   + ("helped" if r1["pta+heads"] > r1["pta"] + 0.02 and r1["heads"] > r1["neither"] + 0.02 else
                      "did not consistently help" if not (r1["pta+heads"] < r1["pta"] - 0.02 and r1["heads"] <
                                                          r1["neither"] - 0.02) else "hurt")
                   + " retrieval at this budget. At 64 patches of 64 px the tower is so small that pruning saves "
                   "little wall-clock, and one seed on a few hundred images is noisy: differences of a few points "
                   "are within run-to-run variation.")
    return out


def write_report(args: argparse.Namespace, easy: dict[str, Any] | None, pa: dict[str, Any] | None,
                 total_s: float) -> Path:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    if os.environ.get("LEANVLP_ASSETS"):
        command = f"LEANVLP_ASSETS={os.environ['LEANVLP_ASSETS']} " + command
    lines = [
        "# leanvlp: small-scale reproduction",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores visible, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, shared with other jobs (times are relative: the variants of each "
        f"experiment were trained interleaved, one step each in rotating order). Total run {total_s / 60:.1f} min"
        + (" (--quick: smoke-test sizes, numbers not meaningful)." if args.quick else "."),
        "",
    ]
    images, speed, reach = [], None, None
    blocks: list[str] = []
    if easy is not None:
        easy_lines, speed = easy_vqa_tables(easy)
        blip_lines, reach = blip2_table(easy)
        blocks += easy_lines + [""]
        images += plot_easy_vqa(easy, out)
    if pa is not None:
        blocks += patch_align_table(pa) + [""]
        images += plot_patch_align(pa, out)
    if easy is not None:
        blocks += blip_lines + [""]
    lines += blocks + notes(easy, speed, reach, pa) + [""]
    lines += [f"![{name}]({name})" for name in images] + [""]
    (out / "reproduce_small.md").write_text("\n".join(lines))
    summary = {"easy_vqa": None if easy is None else {
        v.name: {"step_seconds": v.step_seconds, "losses": v.losses, "evals": v.evals} for v in easy["variants"]},
        "patch_align": None if pa is None else {
        v.name: {"step_seconds": v.step_seconds, "losses": v.losses, "evals": v.evals} for v in pa["variants"]}}
    (out / "reproduce_small.json").write_text(json.dumps(summary, default=float) + "\n")
    return out / "reproduce_small.md"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=40.0, help="wall-clock for the whole run")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, ~5 minutes")
    parser.add_argument("--only", choices=["all", "mergebridge", "patchalign"], default="all")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--eval-images", type=int, default=40)
    parser.add_argument("--questions-per-image", type=int, default=2)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--num-evals", type=int, default=4, help="evaluations after step 0")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--patchalign-share", type=float, default=0.15, help="share of the budget for experiment 2")
    parser.add_argument("--shapes-train", type=int, default=512)
    parser.add_argument("--shapes-eval", type=int, default=64)
    parser.add_argument("--pa-batch-size", type=int, default=16)
    parser.add_argument("--pa-lr", type=float, default=1e-3)
    parser.add_argument("--pa-max-steps", type=int, default=1500)
    args = parser.parse_args(argv)
    if args.quick:
        defaults = dict(budget_minutes=5.0, train_images=48, eval_images=8, questions_per_image=1, num_evals=2,
                        max_steps=6, shapes_train=64, shapes_eval=16, warmup=2)
        for key, value in defaults.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    for name in ("budget_minutes", "batch_size", "train_images", "eval_images", "threads", "max_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    budget = 60 * args.budget_minutes

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)

    easy = pa = None
    pa_budget = budget * args.patchalign_share if args.only == "all" else budget
    if args.only in ("all", "mergebridge"):
        easy = easy_vqa_experiment(args, budget - (pa_budget if args.only == "all" else 0) - 20, log)
        easy.update(batch_size=args.batch_size, lr=args.lr)
    if args.only in ("all", "patchalign"):
        pa = patch_align_experiment(args, budget - (time.perf_counter() - start) - 10, log)
        pa["batch_size"] = args.pa_batch_size
    path = write_report(args, easy, pa, time.perf_counter() - start)
    log(f"wrote {path}")
    print(path.read_text())


if __name__ == "__main__":
    main()
