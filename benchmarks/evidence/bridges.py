"""Experiment (c) of issue #15: does the merged bridge match the unmerged one at a fraction of the compute, and how
does it compare with a BLIP-2 Q-Former bridge?

Claims under test (SimVLG / EVLGen, methods.md section 2): merging visual tokens inside the bridge cuts the frozen
LLM's cost at little accuracy loss; a one-stage merged bridge trained with the LM loss alone learns faster than a
Q-Former trained the same way (no BLIP-2 first stage). Set-up, every arm alike:

- vision: DINOv2-S/14 at 112 px (the `dinov2-small-112px` asset: CLS + 8x8 patches = 65 tokens), FROZEN; its
  `vision_feature_layer` tokens (the penultimate layer, no final norm, as `from_vision_text_pretrained` sets) are
  computed once per image and CACHED: every arm reads the same cached features, so the timed step is bridge + LLM.
- LLM: SmolLM2-135M-Instruct, FROZEN (weights never get gradients; the gradient reaches the bridge through it).
- bridges (the trained part), each initialised from the first 3 layers of all-MiniLM-L6-v2 (384 wide):
  MergeBridge's bridge with r = 0 / 8 / 16 tokens merged per layer: 65 -> 65 / 41 / 17 visual tokens reach the
  LLM (3 layers: deep enough that r=16 keeps 17 tokens instead of collapsing to 3 as 6 layers would); and a
  Q-Former bridge: transformers' own `Blip2QFormerModel` (3 layers, cross-attention in layers 0 and 2, as BLIP-2's
  every-2nd-layer), 32 learned queries cross-attending the same cached features, a Linear into the LLM width
  (`QFormerBridge` of benchmarks/reproduce_small.py).
- training: easy-vqa questions only (no captions: the budget), prompt "Question: {q} Short answer:" (the
  processor's VQA template), LM loss on the answer tokens + EOS (the processor's labels; the LM head is applied only
  there), AdamW, linear warm-up then constant lr, gradient clipping 1.0 (reproduce_small's `PrefixLM`); every arm of
  a seed sees the same questions in the same order; seed s also fixes the bridges' random parts and dropout.
- schedule: every arm is evaluated at `steps` (EQUAL STEPS) and trains on to round(steps x cost_ratio[arm]) steps,
  cost_ratio = r0's CPU seconds per step over the arm's (measured by --pilot and fixed in SETTINGS, so the step
  counts, and with them the numbers, do not depend on the machine's load), where it is evaluated again (EQUAL
  TRAINING CPU TIME, about r0's; the measured seconds are reported).
- evaluation: 400 held-out questions, 4 distinct ones on each of the first 100 easy-vqa test images that have 4;
  exact-match accuracy by RANKING THE 13 ANSWERS' LIKELIHOOD (log-probability of the answer's tokens after the
  prompt; "teal" is two tokens, so its first token is appended to the prompt and its second token read there; EOS
  not scored). Each image prefix goes through the LLM once and its questions continue from its KV cache (checked
  against one plain forward per prompt for every arm before the runs).
- controls: image-blind per-question-type majority (yes/no, shape, colour: the training majority answer of the
  type) and per-question-text majority (the strongest image-blind answerer); shuffled-image evaluation of every
  trained model at its last step (each image's questions asked with another image's features, a fixed
  derangement: a model that reads the image must drop).
- reported: accuracy at equal steps and at equal training CPU time, training CPU seconds to reach a fixed accuracy
  (the per-text majority + 0.05), measured CPU seconds per step and LLM tokens per sample; paired differences over
  seeds with a 95% t-interval; merged-vs-unmerged as non-inferiority with a 0.05 margin.

Times are process CPU seconds (`time.process_time()`, 1 thread): the machine is shared, so wall time grows with the
load and is reported beside them. Resumable: one JSON per (arm, seed) under benchmarks/results/evidence/c_bridges/;
the report (benchmarks/results/evidence.md between this experiment's markers, and evidence_c_bridges.png) is
rewritten from them after every run, or alone with --report.

    python benchmarks/evidence/bridges.py                       # the 3-seed set (~31 CPU min, 1 thread)
    python benchmarks/evidence/bridges.py --report              # tables and plot from the JSON files
    python benchmarks/evidence/bridges.py --pilot               # seconds per step / evaluation of each arm
    python benchmarks/evidence/bridges.py --arms r16 --seeds 0 --force   # one run again (same numbers)
    python benchmarks/evidence/bridges.py --long                # one longer single-seed run of one arm
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import BertConfig, BertModel, set_seed  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # benchmarks/ is no package: its scripts are imported as modules

from reproduce_small import PrefixLM, QFormerBridge, frozen_llm, vision_features  # noqa: E402
from semantic_losses import chosen_runs, experiment_parser, interval, mean_sd  # noqa: E402

from leanvlp import assets  # noqa: E402
from leanvlp.assets import EASY_VQA_COLOURS, EASY_VQA_SHAPES  # noqa: E402
from leanvlp.modeling.transformers_compat import CACHE_NAME  # noqa: E402
from leanvlp.modeling.modeling_merge_bridge import MergeBridgeForConditionalGeneration  # noqa: E402
from leanvlp.processing.processing_merge_bridge import MergeBridgeProcessor  # noqa: E402

ROOT = HERE.parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "evidence" / "c_bridges"
LONG_RUNS = RESULTS / "evidence" / "c_bridges_long"
REPORT = RESULTS / "evidence.md"
PLOT = RESULTS / "evidence_c_bridges.png"
BEGIN = "<!-- experiment c: begin (written by benchmarks/evidence/bridges.py) -->"
END = "<!-- experiment c: end -->"

ARMS = {"r0": 0, "r8": 8, "r16": 16, "qformer": None}  # arm -> MergeBridge r (None: the Q-Former bridge)
LABELS = {"r0": "MergeBridge r=0 (unmerged)", "r8": "MergeBridge r=8", "r16": "MergeBridge r=16", "qformer": "Q-Former"}
ANSWERS = ("yes", "no", *EASY_VQA_SHAPES, *EASY_VQA_COLOURS)
SETTINGS = dict(
    image_size=112, bridge_layers=3, num_queries=32, batch_size=8, steps=12, lr=1e-3, warmup=3, train_images=1000,
    eval_images=100, questions_per_image=4, eval_batch_size=50, eval_every=0, eval_at_start=False, eval_seed=7,
    shuffle_seed=11,
    # r0's CPU seconds per step over each arm's (two --pilot runs: 4.95, 3.48, 2.40, 2.95 s): equal-CPU-time step counts
    cost_ratio={"r0": 1.0, "r8": 1.42, "r16": 2.06, "qformer": 1.68},
)
LONG = dict(arm="r16", seed=0, steps=150, eval_every=50)  # its first steps repeat the set's r16 seed-0 run


# ----------------------------------------------------------------------------- data


def question_type(question: str) -> str:
    """easy-vqa's three question kinds, from the text alone (what an image-blind answerer may use)."""
    words = question.lower().rstrip("?").split()
    if words[0] in ("is", "does"):
        return "yes/no"
    if "color" in words or "colour" in words:
        return "colour"
    if words[0] == "what" and "shape" in words:
        return "shape"
    raise ValueError(f"question_type: unknown easy-vqa question {question!r}")


@dataclass
class Data:
    """Cached frozen-tower features and the questions: the training pool and the held-out evaluation set."""

    train_images: list[Any]
    train_features: Tensor  # (N_train, N_vis, C_vis)
    train_qa: list[tuple[int, str, str]]  # (image index, question, answer)
    eval_images: list[Any]
    eval_features: Tensor  # (N_eval_images, N_vis, C_vis)
    eval_qa: list[tuple[int, str, str]]  # questions_per_image per evaluation image
    shuffle: list[int]  # shuffled-image control: the questions of image i are asked with image shuffle[i]


def derangement(n: int, seed: int) -> list[int]:
    """A fixed permutation with no fixed point: every image's questions get another image."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out = [0] * n
    for k in range(n):  # a cycle through the shuffled order
        out[order[k]] = order[(k + 1) % n]
    return out


def make_data(s: dict[str, Any], train_rows: Any, test_rows: Any, train_features: Tensor, eval_features: Tensor
              ) -> Data:
    """The training pool (every question of every training image) and the evaluation draw: `questions_per_image`
    distinct questions of each test image given (so the LLM reads each image prefix once)."""
    rng = random.Random(s["eval_seed"])
    eval_qa = []
    for i, row in enumerate(test_rows):
        if len(row["questions"]) < s["questions_per_image"]:
            raise ValueError(f"questions_per_image: test image {i} has {len(row['questions'])} questions, "
                             f"asked {s['questions_per_image']}")
        for k in sorted(rng.sample(range(len(row["questions"])), s["questions_per_image"])):
            eval_qa.append((i, row["questions"][k], row["answers"][k][0]))
    train_qa = [(i, q, a[0]) for i, row in enumerate(train_rows) for q, a in zip(row["questions"], row["answers"])]
    return Data([r["image"] for r in train_rows], train_features, train_qa, [r["image"] for r in test_rows],
                eval_features, eval_qa, derangement(len(test_rows), s["shuffle_seed"]))


def load_data(s: dict[str, Any], feature_model: MergeBridgeForConditionalGeneration,
              processor: MergeBridgeProcessor, cache: Path | None) -> Data:
    """easy-vqa rows and their frozen-tower features (cached on disk when `cache` is given)."""
    train_rows = assets.load_easy_vqa("train", limit=s["train_images"])
    test_rows = assets.load_easy_vqa("test")
    enough = [i for i, q in enumerate(test_rows["questions"]) if len(q) >= s["questions_per_image"]]
    test_rows = test_rows.select(enough[:s["eval_images"]])  # the first test images with enough questions
    key = {k: s[k] for k in ("image_size", "train_images", "eval_images", "questions_per_image")}
    stored = torch.load(cache) if cache is not None and cache.exists() else None
    if stored is None or stored["key"] != key:
        train_feats, _ = vision_features(feature_model, processor, [r["image"] for r in train_rows])
        eval_feats, _ = vision_features(feature_model, processor, [r["image"] for r in test_rows])
        stored = {"key": key, "train": train_feats, "eval": eval_feats}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(stored, cache)
    return make_data(s, train_rows, test_rows, stored["train"], stored["eval"])


def eval_subset(data: Data, n: int) -> Data:
    """The first n evaluation images with their questions (a pilot's or a check's evaluation set)."""
    return dataclasses.replace(data, eval_images=data.eval_images[:n], eval_features=data.eval_features[:n],
                               eval_qa=[qa for qa in data.eval_qa if qa[0] < n], shuffle=derangement(n, 0))


def training_stream(data: Data, seed: int, count: int) -> list[tuple[int, str, str]]:
    """The seed's question order: identical for every arm of the seed (the pairing)."""
    rng = random.Random(seed)
    return [data.train_qa[rng.randrange(len(data.train_qa))] for _ in range(count)]


def blind_controls(data: Data) -> dict[str, float]:
    """Accuracy of image-blind answerers trained on the training questions: the per-type and per-text majority."""
    by_type: dict[str, Counter] = {}
    by_text: dict[str, Counter] = {}
    for _, q, a in data.train_qa:
        by_type.setdefault(question_type(q), Counter())[a] += 1
        by_text.setdefault(q, Counter())[a] += 1
    type_hits = text_hits = 0
    for _, q, a in data.eval_qa:
        type_hits += by_type[question_type(q)].most_common(1)[0][0] == a
        text_answer = (by_text.get(q) or by_type[question_type(q)]).most_common(1)[0][0]
        text_hits += text_answer == a
    n = len(data.eval_qa)
    return {"type_majority": type_hits / n, "text_majority": text_hits / n,
            "type_answers": {t: c.most_common(1)[0][0] for t, c in sorted(by_type.items())}}


# ----------------------------------------------------------------------------- models


def bert_init(minilm: Path, layers: int) -> BertModel:
    """The first `layers` layers of all-MiniLM-L6-v2: what both bridge kinds start from."""
    return BertModel.from_pretrained(str(minilm), num_hidden_layers=layers)


def merge_bridge_model(s: dict[str, Any], r: int, seed: int, dirs: dict[str, Path]
                       ) -> MergeBridgeForConditionalGeneration:
    """The library's MergeBridge (frozen DINOv2-S and SmolLM2), bridge = MiniLM's first layers merging r per layer."""
    set_seed(seed)
    bridge_config = BertConfig.from_pretrained(str(dirs["minilm"]), num_hidden_layers=s["bridge_layers"])
    return MergeBridgeForConditionalGeneration.from_vision_text_pretrained(
        str(dirs["vision"]), str(dirs["llm"]), bridge_init=str(dirs["minilm"]), bridge_config=bridge_config,
        bridge_merging={"r": r}, freeze_vision=True, freeze_llm=True)


@dataclass
class Arm:
    """One trained bridge in front of the shared frozen LLM, with its processor (its `<image>` expansion)."""

    name: str
    lm: PrefixLM
    processor: MergeBridgeProcessor
    num_tokens: int
    module: nn.Module


def build_arm(name: str, s: dict[str, Any], seed: int, dirs: dict[str, Path], llm: nn.Module,
              check: Data | None = None) -> Arm:
    """Arm `name` initialised from `seed`. MergeBridge arms of one seed start from the same bridge weights (r only
    changes the matching); with `check`, the cached-feature loss must equal `MergeBridge.forward` from pixels."""
    r = ARMS[name]
    model = merge_bridge_model(s, 0 if r is None else r, seed, dirs)
    image_token_id = model.config.image_token_id
    if r is None:
        set_seed(seed)
        module: nn.Module = QFormerBridge(model.config.vision_config.hidden_size, llm.config.hidden_size,
                                          bert_init(dirs["minilm"], s["bridge_layers"]), s["num_queries"])
        num_tokens = s["num_queries"]
        bridge = module
    else:
        module = model.model.bridge
        num_tokens = model.config.num_image_tokens

        def bridge(v: Tensor, m: nn.Module = module) -> Tensor:
            return m(v).last_hidden_state  # (B, M, C_llm)
    processor = MergeBridgeProcessor.from_vision_text_pretrained(str(dirs["vision"]), str(dirs["llm"]),
                                                                 num_image_tokens=num_tokens)
    if processor.image_token_id != image_token_id:
        raise RuntimeError(f"{name}: processor <image> id {processor.image_token_id} != model's {image_token_id}")
    lm = PrefixLM(name, bridge, [p for p in module.parameters() if p.requires_grad], [module], processor, llm,
                  image_token_id, s["lr"], s["warmup"])
    if check is not None and r is not None:
        qa = check.train_qa[:2]
        images = [check.train_images[i] for i, _, _ in qa]
        batch = processor(images=images, text=[processor.build_prompt("vqa", question=q) for _, q, _ in qa],
                          targets=[a for *_, a in qa])
        model.eval()
        with torch.no_grad():
            library = float(model(**batch).loss)
            cached = float(lm.loss(dict(batch), check.train_features[[i for i, _, _ in qa]]))
        if abs(library - cached) > 1e-4:
            raise RuntimeError(f"{name}: cached-feature loss {cached} != MergeBridge.forward loss {library}")
    del model
    return Arm(name, lm, processor, num_tokens, module)


# ----------------------------------------------------------------------------- evaluation


def answer_token_ids(tokenizer: Any) -> tuple[list[int], int | None, int | None]:
    """First token of each answer (space-prefixed, as the processor appends targets) and, for the one answer allowed
    to take two tokens, its first and second token ids."""
    ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    long = [i for i, t in enumerate(ids) if len(t) > 1]
    if len(long) > 1 or any(len(ids[i]) > 2 for i in long) or len({t[0] for t in ids}) != len(ids):
        raise ValueError(f"answer_token_ids: one-forward ranking needs distinct first tokens and at most one "
                         f"two-token answer; got {dict(zip(ANSWERS, ids))}")
    first = [t[0] for t in ids]
    return (first, long[0], ids[long[0]][1]) if long else (first, None, None)


def eval_tokens(arm: Arm, data: Data) -> tuple[Tensor, Tensor, int]:
    """Right-padded ids / mask of every evaluation prompt, and the prefix length P: the tokens up to the last
    `<image>` token, identical in every row, so the LLM reads each image's prefix once (a KV cache)."""
    proc = arm.processor
    batch = proc(images=[data.eval_images[i] for i, _, _ in data.eval_qa], padding_side="right",
                 text=[proc.build_prompt("vqa", question=q) for _, q, _ in data.eval_qa])
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (Q, L)
    image = (ids[0] == proc.image_token_id).nonzero()
    prefix = int(image[-1]) + 1
    if len(image) != arm.num_tokens or not bool((ids[:, :prefix] == ids[0, :prefix]).all()):
        raise RuntimeError(f"{arm.name}: evaluation prompts do not share one image prefix ({len(image)} image tokens)")
    return ids, mask, prefix


@torch.no_grad()
def answer_scores(arm: Arm, data: Data, image_maps: list[list[int]], batch_size: int) -> list[Tensor]:
    """(Q, 13) log-likelihood of each answer after each evaluation question, read with image `image_of[q]`, for
    each `image_of` in `image_maps` (the normal and the shuffled-image evaluation share the prefixes).

    The prefix (image tokens) of every evaluation image goes through the LLM once; each question batch continues
    from a copy of those caches, right-padded, and is read at its own last token (the answer's first token) and, for
    the two-token answer, at its first token appended after the prompt (the second token's probability)."""
    for m in arm.lm.modules:
        m.eval()
    llm, (first, two, second) = arm.lm.llm, answer_token_ids(arm.processor.tokenizer)
    ids, mask, prefix = eval_tokens(arm, data)
    prefix_ids = ids[:1, :prefix].expand(len(data.eval_images), -1)
    prefix_out = llm.model(inputs_embeds=arm.lm.embeds(prefix_ids, data.eval_features), use_cache=True)
    cache = prefix_out[CACHE_NAME]
    out: list[list[Tensor]] = [[] for _ in image_maps]
    for k, image_of in enumerate(image_maps):
        for start in range(0, len(data.eval_qa), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(data.eval_qa)))
            q_ids, q_mask = ids[rows, prefix:], mask[rows, prefix:]  # (B, Lq)
            lengths = q_mask.sum(1)  # (B,)
            at = torch.arange(len(rows))
            if two is not None:  # append the two-token answer's first token after each prompt
                q_ids = torch.cat([q_ids, q_ids.new_zeros(len(rows), 1)], 1)
                q_mask = torch.cat([q_mask, q_mask.new_zeros(len(rows), 1)], 1)
                q_ids[at, lengths], q_mask[at, lengths] = first[two], 1
            rows_cache = copy.deepcopy(cache)
            rows_cache.batch_select_indices(torch.tensor([image_of[data.eval_qa[int(r)][0]] for r in rows]))
            positions = (prefix + torch.arange(q_ids.shape[1])).expand(len(rows), -1)  # (B, Lq)
            hidden = llm.model(inputs_embeds=llm.get_input_embeddings()(q_ids), position_ids=positions,
                               attention_mask=torch.cat([q_mask.new_ones(len(rows), prefix), q_mask], 1),
                               **{CACHE_NAME: rows_cache}).last_hidden_state  # (B, Lq, C)
            scores = llm.lm_head(hidden[at, lengths - 1]).float().log_softmax(-1)[:, first]  # (B, 13)
            if two is not None:
                scores[:, two] += llm.lm_head(hidden[at, lengths]).float().log_softmax(-1)[:, second]
            out[k].append(scores)
    return [torch.cat(scores) for scores in out]


@torch.no_grad()
def full_answer_scores(arm: Arm, data: Data, questions: list[int]) -> Tensor:
    """The same scores from one plain forward of each whole prompt (no cache, no padding): the reference the
    cached path is checked against."""
    for m in arm.lm.modules:
        m.eval()
    llm, (first, two, second) = arm.lm.llm, answer_token_ids(arm.processor.tokenizer)
    ids, mask, _ = eval_tokens(arm, data)
    out = []
    for q in questions:
        seq = ids[q][mask[q].bool()]
        if two is not None:
            seq = torch.cat([seq, seq.new_tensor([first[two]])])
        image = data.eval_qa[q][0]
        hidden = llm.model(inputs_embeds=arm.lm.embeds(seq[None], data.eval_features[image:image + 1])
                           ).last_hidden_state[0]  # (L, C)
        at = -2 if two is not None else -1
        scores = llm.lm_head(hidden[at]).float().log_softmax(-1)[first]
        if two is not None:
            scores[two] += llm.lm_head(hidden[-1]).float().log_softmax(-1)[second]
        out.append(scores)
    return torch.stack(out)


def check_ranking(arm: Arm, data: Data) -> None:
    """The cached-prefix, batched scores equal one plain forward per prompt (fp32, 30 layers: 1e-3 in log-prob)."""
    identity = list(range(len(data.eval_images)))
    cached, shuffled = answer_scores(arm, data, [identity, data.shuffle], batch_size=3)
    if torch.equal(cached, shuffled):
        raise RuntimeError(f"{arm.name}: the shuffled-image scores equal the normal ones: the images are not read")
    full = full_answer_scores(arm, data, list(range(len(data.eval_qa))))
    if not torch.allclose(cached, full, atol=1e-3, rtol=0):
        raise RuntimeError(f"{arm.name}: cached ranking differs from the plain forward by "
                           f"{float((cached - full).abs().max()):.2e}")


def accuracies(arm: Arm, data: Data, batch_size: int, shuffled: bool = False) -> list[float]:
    """Exact-match accuracy of the top-ranked answer; with `shuffled` also that of the shuffled-image control (the
    questions of image i asked with image shuffle[i])."""
    maps = [list(range(len(data.eval_images)))] + ([data.shuffle] if shuffled else [])
    out = []
    for scores in answer_scores(arm, data, maps, batch_size):
        predicted = scores.argmax(-1).tolist()
        out.append(sum(ANSWERS[k] == a for k, (_, _, a) in zip(predicted, data.eval_qa)) / len(data.eval_qa))
    return out


# ----------------------------------------------------------------------------- one run


def arm_steps(name: str, s: dict[str, Any]) -> int:
    """Steps of arm `name`: s["steps"] times its planned cost ratio (r0's CPU seconds per step over its own, measured
    by --pilot and fixed in the settings), so every arm gets about r0's training CPU time."""
    return round(s["steps"] * s["cost_ratio"].get(name, 1.0))


def run(name: str, seed: int, s: dict[str, Any], data: Data, dirs: dict[str, Path], llm: nn.Module,
        log: Any = print) -> dict[str, Any]:
    """Train arm `name` from `seed`; evaluate at s["steps"] (equal steps), at its last step (equal CPU time), every
    `eval_every` steps if > 0 and at 0 if `eval_at_start`; the shuffled-image control at the last step."""
    arm = build_arm(name, s, seed, dirs, llm)
    total = arm_steps(name, s)
    stream = training_stream(data, seed, total * s["batch_size"])
    points = {s["steps"], total} | ({0} if s["eval_at_start"] else set())
    points |= set(range(s["eval_every"], total + 1, s["eval_every"])) if s["eval_every"] > 0 else set()
    points = {p for p in points if p <= total}
    torch.manual_seed(seed)  # dropout
    cpu = wall = eval_cpu = 0.0
    tokens = padded = 0
    shuffled = None
    curve, losses = [], []
    for step in range(total + 1):
        if step in points:
            start = time.process_time()
            acc, *rest = accuracies(arm, data, s["eval_batch_size"], shuffled=step == total)
            shuffled = rest[0] if rest else None
            eval_cpu += time.process_time() - start
            curve.append({"step": step, "train_cpu_seconds": round(cpu, 3), "train_seconds": round(wall, 3),
                          "accuracy": acc})
            log(f"    {name} seed {seed} step {step:4d}  {cpu:7.1f}s cpu {wall:7.1f}s wall  accuracy {acc:.3f}")
        if step == total:
            break
        chunk = stream[step * s["batch_size"]:(step + 1) * s["batch_size"]]
        batch = dict(arm.processor(images=[data.train_images[i] for i, _, _ in chunk],
                                   text=[arm.processor.build_prompt("vqa", question=q) for _, q, _ in chunk],
                                   targets=[a for *_, a in chunk]))
        batch.pop("pixel_values")  # the features are cached
        tokens += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
        features = data.train_features[[i for i, _, _ in chunk]]
        start, wall_start = time.process_time(), time.perf_counter()
        losses.append(arm.lm.train_step(batch, features))
        cpu += time.process_time() - start
        wall += time.perf_counter() - wall_start
    log(f"    {name} seed {seed} shuffled-image accuracy {shuffled:.3f}")
    return {"arm": name, "seed": seed, "settings": s, "steps": total, "visual_tokens": arm.num_tokens,
            "llm_tokens_per_sample": round(tokens / len(stream), 2),
            "padded_tokens_per_sample": round(padded / len(stream), 2), "curve": curve,
            "shuffled_accuracy": shuffled, "losses": [round(x, 5) for x in losses],
            "cpu_seconds_per_step": round(cpu / max(total, 1), 4), "eval_cpu_seconds": round(eval_cpu, 1),
            "trainable_parameters": sum(p.numel() for p in arm.lm.params), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run_all(jobs: list[tuple[str, int, dict[str, Any], Path]], data: Data, dirs: dict[str, Path], llm: nn.Module,
            force: bool = False, after: Any = None) -> None:
    """Run every (arm, seed, settings, folder) job whose JSON is missing (all with `force`); `after()` follows each."""
    for name, seed, settings, folder in jobs:
        path = folder / f"{name}_seed{seed}.json"
        if path.exists() and not force:
            if json.loads(path.read_text())["settings"] != settings:
                raise SystemExit(f"{path} was run with other settings; delete it or pass --force")
            print(f"skip {name} seed {seed}: {path.name} exists", flush=True)
            continue
        print(f"run {name} seed {seed}", flush=True)
        record = run(name, seed, settings, data, dirs, llm)
        record["controls"] = blind_controls(data)
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        if after is not None:
            after()


# ----------------------------------------------------------------------------- analysis, report


def load_runs(folder: Path) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["arm"], {})[record["seed"]] = record
    return runs


def at_step(record: dict[str, Any], step: int) -> float:
    """Accuracy of the run's evaluation at `step`."""
    return next(p["accuracy"] for p in record["curve"] if p["step"] == step)


def equal_steps(record: dict[str, Any]) -> float:
    return at_step(record, record["settings"]["steps"])


def equal_time(record: dict[str, Any]) -> float:
    """Accuracy at the run's last step: every arm trains about r0's CPU time (`cost_ratio`)."""
    return record["curve"][-1]["accuracy"]


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    """Training CPU seconds at the first evaluation at or above `target` (None: never within the run)."""
    return next((p["train_cpu_seconds"] for p in curve if p["accuracy"] >= target), None)


def fmt_interval(values: list[float]) -> str:
    bounds = interval(values)
    return "-" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def non_inferior(diffs: list[float], margin: float) -> str:
    """Verdict on `a matches b` from the paired differences a - b and a non-inferiority margin."""
    bounds = interval(diffs)
    if bounds is None:
        return "inconclusive (fewer than 2 paired seeds)"
    if bounds[0] > -margin:
        return "held"
    if bounds[1] < -margin:
        return "did not hold"
    return "inconclusive"


def superior(diffs: list[float]) -> str:
    bounds = interval(diffs)
    if bounds is None:
        return "inconclusive (fewer than 2 paired seeds)"
    return "held" if bounds[0] > 0 else "did not hold" if bounds[1] < 0 else "inconclusive"


MARGIN = 0.05  # non-inferiority margin: 5 accuracy points (the binomial standard error of 400 questions is ~2.5)


def report(runs: dict[str, dict[int, dict[str, Any]]], long: dict[str, dict[int, dict[str, Any]]]) -> str:
    lines = [BEGIN, "", "## (c) Merged bridge vs unmerged vs a BLIP-2 Q-Former bridge (real assets)", ""]
    base = runs.get("r0", {})
    if not base:
        return "\n".join(lines + ["No finished `r0` run yet: nothing to compare.", "", END])
    seeds = sorted(base)
    first = base[seeds[0]]
    s, controls = first["settings"], first["controls"]
    lines += [
        f"Frozen DINOv2-S/14 at {s['image_size']} px ({first['visual_tokens']} tokens; features cached once, every "
        "arm reads the same) -> "
        f"bridge -> frozen SmolLM2-135M-Instruct, trained with the LM loss on the answer tokens of easy-vqa "
        f"questions ({s['train_images']} training images), batch {s['batch_size']}, AdamW lr "
        f"{s['lr']} (warm-up {s['warmup']} steps), the same question order per seed for every arm. Equal steps: "
        f"every arm at step {s['steps']}. Equal CPU time: each arm trains on to step {s['steps']} x (r0's CPU "
        f"seconds per step / its own, measured by --pilot: {s['cost_ratio']}), so all arms get about r0's "
        f"training CPU time. Bridges from the "
        f"first {s['bridge_layers']} layers of all-MiniLM-L6-v2: MergeBridge r=0/8/16 (visual tokens: "
        + ", ".join(f"{a} {next(iter(runs[a].values()))['visual_tokens']}" for a in ARMS if runs.get(a))
        + f"), Q-Former = transformers' `Blip2QFormerModel` with {s['num_queries']} queries. Accuracy: the top of the "
        f"13 answers ranked by likelihood, on {s['eval_images'] * s['questions_per_image']} easy-vqa test questions "
        f"({s['questions_per_image']} on each of {s['eval_images']} images). Seeds {seeds}; paired differences over seeds with a 95% "
        f"t-interval; non-inferiority margin {MARGIN:.2f}. Times are training CPU seconds (1 thread, "
        "`time.process_time()`, evaluation excluded). Written by `benchmarks/evidence/bridges.py` from "
        "`benchmarks/results/evidence/c_bridges*/`; plot `evidence_c_bridges.png`.",
        "",
        f"Image-blind controls on the same questions: per-question-type majority {controls['type_majority']:.3f} "
        f"(answers {controls['type_answers']}); per-question-text majority {controls['text_majority']:.3f}.",
        "",
        "### Equal steps",
        "",
        "| arm | seeds | visual tokens | LLM tokens / sample | CPU s / step | step cost vs r0 | accuracy | "
        "- r0 (mean, 95% interval) | - Q-Former (mean, 95% interval) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cost = {a: [runs[a][k]["cpu_seconds_per_step"] for k in runs[a]] for a in ARMS if runs.get(a)}
    q = runs.get("qformer", {})
    for arm in ARMS:
        got = runs.get(arm, {})
        paired = [k for k in seeds if k in got]
        if not paired:
            continue
        record = got[paired[0]]
        vs = [("-" if arm == ref or not [k for k in paired if k in other] else
               f"{statistics.mean(d):+.3f} {fmt_interval(d)}")
              for ref, other in (("r0", base), ("qformer", q))
              for d in [[equal_steps(got[k]) - equal_steps(other[k]) for k in paired if k in other]]]
        lines.append(
            f"| {LABELS[arm]} | {len(paired)} | {record['visual_tokens']} | {record['llm_tokens_per_sample']:.1f} | "
            f"{mean_sd(cost[arm], 2)} | {statistics.mean(cost[arm]) / statistics.mean(cost['r0']):.2f} | "
            f"{mean_sd([equal_steps(got[k]) for k in paired])} | {vs[0]} | {vs[1]} |")
    lines += ["", "### Equal training CPU time (each arm's last step) and the shuffled-image control", "",
              "| arm | steps | training CPU s | training wall s | accuracy | - r0 (mean, 95% interval) | - Q-Former "
              "(mean, 95% interval) | shuffled-image accuracy | accuracy - shuffled (mean, 95% interval) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        got = runs.get(arm, {})
        paired = [k for k in seeds if k in got]
        if not paired:
            continue
        vs = [("-" if arm == ref or not [k for k in paired if k in other] else
               f"{statistics.mean(d):+.3f} {fmt_interval(d)}")
              for ref, other in (("r0", base), ("qformer", q))
              for d in [[equal_time(got[k]) - equal_time(other[k]) for k in paired if k in other]]]
        drop = [equal_time(got[k]) - got[k]["shuffled_accuracy"] for k in paired]
        lines.append(
            f"| {LABELS[arm]} | {got[paired[0]]['steps']} | "
            f"{mean_sd([got[k]['curve'][-1]['train_cpu_seconds'] for k in paired], 0)} | "
            f"{mean_sd([got[k]['curve'][-1]['train_seconds'] for k in paired], 0)} | "
            f"{mean_sd([equal_time(got[k]) for k in paired])} | {vs[0]} | {vs[1]} | "
            f"{mean_sd([got[k]['shuffled_accuracy'] for k in paired])} | "
            f"{statistics.mean(drop):+.3f} {fmt_interval(drop)} |")
    targets = {"the per-type image-blind majority": controls["type_majority"],
               f"the per-text image-blind majority + {MARGIN:.2f}": controls["text_majority"] + MARGIN}
    lines += ["", "### Training CPU time to reach a fixed accuracy", "",
              "| arm | " + " | ".join(f"{v:.3f} ({k}): reached, CPU s" for k, v in targets.items()) + " |",
              "|---|" + "---|" * len(targets)]
    for arm in ARMS:
        got = runs.get(arm, {})
        if got:
            cells = []
            for target in targets.values():
                hit = [x for x in (time_to(r["curve"], target) for r in got.values()) if x is not None]
                cells.append(f"{len(hit)}/{len(got)}, {mean_sd(hit, 0) if hit else 'never'}")
            lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "### Verdicts", ""] + verdicts(runs, seeds, controls)
    for arm, got in long.items():
        for seed, record in got.items():
            curve, short = record["curve"], runs.get(arm, {}).get(seed)
            if short is not None:  # same seed, same data order: the first steps must repeat the set's run exactly
                n = len(short["losses"])
                same = record["losses"][:n] == short["losses"]
                lines += ["", f"Same seed, same numbers: the longer run's first {n} training losses "
                          + ("equal" if same else "DIFFER FROM") + f" those of the set's {arm} seed-{seed} run."]
            curve = record["curve"]
            lines += ["", f"### Longer single-seed run: {LABELS[arm]}, seed {seed}, {record['settings']['steps']} "
                      f"steps ({curve[-1]['train_cpu_seconds']:.0f} training CPU seconds)", "",
                      "| step | " + " | ".join(str(p["step"]) for p in curve) + " | shuffled images |",
                      "|---|" + "---|" * (len(curve) + 1),
                      "| accuracy | " + " | ".join(f"{p['accuracy']:.3f}" for p in curve)
                      + f" | {record['shuffled_accuracy']:.3f} |"]
    return "\n".join(lines + ["", END])


def verdicts(runs: dict[str, dict[int, dict[str, Any]]], seeds: list[int], controls: dict[str, Any]) -> list[str]:
    """One sentence per claim: held / did not hold / inconclusive, with the interval that decides it."""
    out = []
    reads = {}
    for arm in ARMS:
        got = runs.get(arm, {})
        drop = [equal_time(got[k]) - got[k]["shuffled_accuracy"] for k in seeds if k in got]
        above = [equal_time(got[k]) - controls["text_majority"] for k in seeds if k in got]
        if not drop:
            continue
        found = (superior(drop), superior(above))
        reads[arm] = found == ("held", "held")
        text = "held" if reads[arm] else "did not hold" if "did not hold" in found else "inconclusive"
        out.append(f"- {LABELS[arm]} reads the image at its last step (accuracy above its shuffled-image accuracy and "
                   f"above the per-text image-blind majority): {text} (accuracy - shuffled "
                   f"{statistics.mean(drop):+.3f}, 95% interval {fmt_interval(drop)}; accuracy - blind "
                   f"{statistics.mean(above):+.3f}, {fmt_interval(above)}).")
    for arm in ("r8", "r16"):
        got = runs.get(arm, {})
        for what, value in (("equal steps", equal_steps), ("equal CPU time", equal_time)):
            diff = [value(got[k]) - value(runs["r0"][k]) for k in seeds if k in got]
            if not diff:
                continue
            verdict = non_inferior(diff, MARGIN)
            if not reads.get("r0") and not reads.get(arm):
                verdict = ("inconclusive: neither bridge reads the image at this budget, so matching means nothing "
                           f"(formally {verdict} at margin {MARGIN:.2f})")
            out.append(f"- {LABELS[arm]} matches r=0 at {what} (non-inferiority, margin {MARGIN:.2f}): {verdict} "
                       f"(difference {statistics.mean(diff):+.3f}, 95% interval {fmt_interval(diff)}).")
    for arm in ("r0", "r8", "r16"):
        got, q = runs.get(arm, {}), runs.get("qformer", {})
        for what, value in (("equal steps", equal_steps), ("equal CPU time", equal_time)):
            diff = [value(got[k]) - value(q[k]) for k in seeds if k in got and k in q]
            if diff:
                out.append(f"- {LABELS[arm]} beats the Q-Former at {what}: {superior(diff)} (difference "
                           f"{statistics.mean(diff):+.3f}, 95% interval {fmt_interval(diff)}).")
    return out


def write_report(runs: dict[str, dict[int, dict[str, Any]]], long: dict[str, dict[int, dict[str, Any]]]) -> None:
    section = report(runs, long)
    text = REPORT.read_text() if REPORT.exists() else "# Evidence that the techniques keep quality (issue #15)\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    REPORT.write_text(text)
    if runs:
        plot(runs, long)


def plot(runs: dict[str, dict[int, dict[str, Any]]], long: dict[str, dict[int, dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 + bool(long), figsize=(5 * (3 + bool(long)), 4.2))
    controls = next(iter(next(iter(runs.values())).values()))["controls"]
    for col, x_key in enumerate(("step", "train_cpu_seconds")):
        ax = axes[col]
        for arm in ARMS:
            curves = list(runs.get(arm, {}).values())
            if not curves:
                continue
            n = min(len(c["curve"]) for c in curves)
            x = np.mean([[p[x_key] for p in c["curve"][:n]] for c in curves], axis=0)
            y = np.array([[p["accuracy"] for p in c["curve"][:n]] for c in curves])
            ax.plot(x, y.mean(0), marker="o", label=f"{LABELS[arm]} ({len(curves)} seeds)")
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.15)
        ax.set_xlabel("training step" if x_key == "step" else "training CPU seconds (1 thread, mean over seeds)")
    accuracy_axes = [axes[0], axes[1]] + ([axes[3]] if long else [])
    for ax in accuracy_axes:
        ax.axhline(controls["type_majority"], color="grey", ls="--", lw=1, label="blind: per-type majority")
        ax.axhline(controls["text_majority"], color="black", ls=":", lw=1, label="blind: per-text majority")
        ax.set_ylabel("easy-vqa test accuracy (13-answer ranking)")
    for arm in ARMS:  # the training loss: what the bridges do learn within the budget
        curves = [c["losses"] for c in runs.get(arm, {}).values()]
        if curves:
            n = min(len(c) for c in curves)
            y = np.array([c[:n] for c in curves])
            axes[2].plot(range(1, n + 1), y.mean(0), label=LABELS[arm])
            axes[2].fill_between(range(1, n + 1), y.min(0), y.max(0), alpha=0.15)
    axes[2].set(xlabel="training step", ylabel="LM loss on the answer tokens (mean over seeds)", yscale="log")
    for arm, got in long.items():
        for seed, record in got.items():
            axes[3].plot([p["step"] for p in record["curve"]], [p["accuracy"] for p in record["curve"]], marker="o",
                         label=f"{LABELS[arm]}, seed {seed}")
            axes[3].axhline(record["shuffled_accuracy"], color="red", ls="-.", lw=1, label="its shuffled-image accuracy")
        axes[3].set_xlabel("training step (longer single-seed run)")
        axes[3].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Experiment (c): bridges on frozen DINOv2-S + SmolLM2-135M, easy-vqa (mean, band = min..max)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def prepare(s: dict[str, Any], log: Any = print) -> tuple[dict[str, Path], nn.Module, Data]:
    """Assets (converted once into ~/.cache/leanvlp/assets), the shared frozen LLM and the cached features."""
    dirs = {"vision": assets.prepare_dinov2_small(image_size=s["image_size"]), "llm": assets.prepare_smollm2(),
            "minilm": assets.prepare_minilm()}
    start = time.process_time()
    feature_model = merge_bridge_model(s, 0, 0, dirs)
    llm = frozen_llm(dirs["llm"], feature_model)  # shared by every arm and seed
    processor = MergeBridgeProcessor.from_vision_text_pretrained(str(dirs["vision"]), str(dirs["llm"]),
                                                                 num_image_tokens=feature_model.config.num_image_tokens)
    cache = assets.assets_dir() / "evidence" / f"c_bridges_features_{s['image_size']}px.pt"
    data = load_data(s, feature_model, processor, cache)
    for name in ARMS:  # the cached-feature loss equals the library's forward from pixels, for every MergeBridge r,
        arm = build_arm(name, s, 0, dirs, llm, check=data)  # and the cached-prefix ranking the plain forward's
        check_ranking(arm, eval_subset(data, 2))
    del feature_model
    log(f"data: {len(data.train_qa)} training questions on {len(data.train_images)} images, "
        f"{len(data.eval_qa)} held-out questions on {len(data.eval_images)} images; features {tuple(data.train_features.shape[1:])}; "
        f"setup {time.process_time() - start:.0f}s cpu")
    return dirs, llm, data


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__.split("\n")[0], list(ARMS), "arms",
                               "CPU seconds per step and per evaluation of each arm")
    parser.add_argument("--long", action="store_true", help=f"the longer single-seed run {LONG}")
    args = parser.parse_args(argv)
    arms, seeds = chosen_runs(parser, args, list(ARMS), "arms")
    s = dict(SETTINGS)
    if args.report:
        write_report(load_runs(RUNS), load_runs(LONG_RUNS))
        return 0
    dirs, llm, data = prepare(s)
    blind = blind_controls(data)
    print(f"image-blind controls: {blind}", flush=True)
    if args.pilot:
        small = eval_subset(data, 25)
        for name in arms:
            record = run(name, 0, {**s, "steps": 3, "cost_ratio": {}, "eval_every": 0}, small, dirs, llm)
            print(f"pilot {name}: {record['cpu_seconds_per_step']:.2f} s cpu per step (3 steps), "
                  f"{record['eval_cpu_seconds'] / 2:.1f} s cpu per evaluation of 25 images x {s['questions_per_image']} "
                  "questions, "
                  f"{record['llm_tokens_per_sample']} LLM tokens per sample", flush=True)
        return 0
    long = {**s, "steps": LONG["steps"], "eval_every": LONG["eval_every"], "cost_ratio": {}}
    jobs = [(LONG["arm"], LONG["seed"], long, LONG_RUNS)] if args.long else [(a, k, s, RUNS) for k in seeds for a in arms]
    run_all(jobs, data, dirs, llm, args.force, after=lambda: write_report(load_runs(RUNS), load_runs(LONG_RUNS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
