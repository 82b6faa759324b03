"""Issue #16 item 3: does text-guided merging keep MergeBridge's VQA accuracy at equal visual-token counts?

Task: the shapes set's grid variant at 112 px (`make_shapes_dataset(layout="grid", questions="one_object_colour")`):
six small shapes (18-25 px, distinct shapes, one per 28 px cell of a 4x4 grid, colours drawn with repeats) on the
textured background; the question asks the colour of one shape ("what color is the star?"), so the answer lives in
about 2x2 of the 8x8 patches, among five distractors. Image-blind control: the colour prior (the most common training
answer, and the most common answer per asked shape), about 1/8.

Model (MergeBridge, every arm alike): the real pretrained DINOv2-S at 112 px (the converted asset
`dinov2-small-112px`: 8x8 patches + CLS = 65 tokens), frozen, read at its penultimate layer without the final norm
(EVLGen's and `from_vision_text_pretrained`'s choice) -> the library's bridge (4 BERT layers, width 128, trained from
scratch) that merges 65 -> 17 or 65 -> 9 tokens -> a 2-layer Llama (width 128, trained from scratch) on a word-level
tokenizer (the answer is one colour word). The frozen tower is deterministic, so its features are computed ONCE per
image and cached (on disk, keyed by the settings); training and evaluation run the model's own bridge and LLM on
them (`cached_forward`), and every run starts by checking that this path gives the loss of
`MergeBridgeForConditionalGeneration.forward` from pixels on a batch.

Arms (per seed the same initial weights and the same data order; only the bridge's merging config differs): unmerged
(r=0: 65 tokens, the ceiling); plain / guided 17 (r per layer [30, 15, 3, 0]); plain / guided 9 ([30, 15, 7, 4]).
Guided = `protect_relevant=2`: in every merging block the 2 tokens most similar to the question (above their image's
mean; the bridge's parameter-free `text_relevance`) are kept out of the matching; 2 is the most the 9-token schedule
allows (`TokenMergingConfig.max_protect_relevant`), used at 17 too so the two counts differ only in r.
Training: every object of every training image gives one question in the dataset's wording (the "?" dropped so the
answer follows the shape word: one attention hop for the tiny LLM), answer + EOS as targets. The training images hold
1 to 6 objects (equal shares; held-out images always 6): the from-scratch LLM first learns to read an object's colour
where no binding is needed, then to bind the shape word to its patches; with six objects only it stayed at the colour
prior for 1000 steps in pilots (as did the previous tiny-ViT version of this benchmark). Learning rate 5e-4: at 3e-3
or 1e-2 Adam's steps scrambled the from-scratch bridge layers (init std 0.02) and even single-object images stayed at
the prior, while 5e-4 reads their colour within ~100 steps (pilot). AdamW, linear warm-up then cosine decay, one CPU
thread. Evaluation every `eval_every` steps on the
held-out images' own questions (one per image, six objects): argmax over the 8 colour words at the answer position.
Verdict per token count: guided minus plain final accuracy, paired over seeds, 95% t-interval: held (above 0), did
not hold (below 0), inconclusive (contains 0). Speed cost of the guidance: guided / plain forward time at equal r
(same weights), interleaved repeats, process CPU seconds; min / median / max of the per-repeat ratios.

Resumable: one JSON per (arm, seed) under benchmarks/results/evidence/text_guided/, skipped when present; the report
(benchmarks/results/text_guided_merging.md between its markers, the PNG beside it) is rewritten from the JSON files
after every run, or alone with --report. The guided 9 run of seed 0 also draws `merge_map`s of held-out images with
the tokens its first block guards outlined in red (text_guided_merging_merge_map.png); `--guard` retrains seed 0's
guided arms (checking they reproduce their JSON exactly), measures how often the guarded patches touch the asked
object (guard.json) and redraws that map.

    python benchmarks/text_guided_merging.py              # the comparison: ~17 CPU min on 1 thread
    python benchmarks/text_guided_merging.py --report     # tables and plots from the JSON files
    python benchmarks/text_guided_merging.py --guard      # where the guard looks, the merge map (~2 CPU min)
    python benchmarks/text_guided_merging.py --pilot --steps 300 --runs-dir /tmp/pilot   # size a run
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from transformers import AutoModel, LlamaConfig, PreTrainedModel  # noqa: E402
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "evidence"))
from semantic_losses import interval, mean_sd  # noqa: E402

from leanvlp.data.shapes import COLOURS, make_shapes_dataset  # noqa: E402
from leanvlp.modeling.configuration_merge_bridge import MergeBridgeConfig  # noqa: E402
from leanvlp.modeling.modeling_merge_bridge import MergeBridgeForConditionalGeneration, prompt_embeds  # noqa: E402
from leanvlp.tiny import build_word_tokenizer, tiny_vision_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "evidence" / "text_guided"
REPORT = RESULTS / "text_guided_merging.md"
PLOT = RESULTS / "text_guided_merging.png"
MERGE_MAP = RESULTS / "text_guided_merging_merge_map.png"
BEGIN = "<!-- text-guided merging: begin (written by benchmarks/text_guided_merging.py) -->"
END = "<!-- text-guided merging: end -->"
IGNORE = -100

ARMS = {"unmerged": [0, 0, 0, 0], "plain 17": [30, 15, 3, 0], "guided 17": [30, 15, 3, 0],
        "plain 9": [30, 15, 7, 4], "guided 9": [30, 15, 7, 4]}  # bridge r per layer
SETTINGS = dict(
    vision="dinov2-small-112px", image_size=112, vision_feature_layer=-2, bridge_hidden=64, bridge_layers=4,
    bridge_heads=2, llm_hidden=64, llm_layers=2, llm_heads=2, init_std=0.02, guard=2, arms=ARMS, batch_size=32,
    steps=500, eval_every=100, learning_rate=5e-4, warmup=0.05, weight_decay=0.01, train_images=4000,
    train_objects=[1, 2, 3, 4, 5, 6], test_images=600,
    data_seed=0, map_arm="guided 9",
)
TINY_VISION = dict(hidden_size=32, layers=2, heads=2)  # `vision="tiny"`: a random DINOv2 for the fast test


# ----------------------------------------------------------------------------- data, tower, features


def shapes_split(s: dict[str, Any], count: int, start: int, num_objects: list[int]) -> dict[str, Any]:
    """Images (N, S, S, 3) uint8, every object's (shape, colour) and box per image, each image's own question: `count`
    images from index `start` on, in equal consecutive chunks of each object count in `num_objects`."""
    parts = []
    for k, n in enumerate(num_objects):
        size = count * (k + 1) // len(num_objects) - count * k // len(num_objects)
        parts.append(make_shapes_dataset(size, image_size=s["image_size"], seed=s["data_seed"],
                                         start_index=start + count * k // len(num_objects), layout="grid",
                                         num_objects=n, questions="one_object_colour"))
    images, objects, boxes, questions, answers = [], [], [], [], []
    for data in parts:
        raw = data.cast_column("image", ImageFeature(decode=False))
        images += [np.asarray(PIL.Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in raw["image"]]
        objects += [list(zip(labels, [a[0] for a in attrs])) for labels, attrs in zip(data["box_labels"],
                                                                                     data["box_attributes"])]
        boxes += data["boxes"]
        questions += [q[0] for q in data["questions"]]
        answers += [a[0][0] for a in data["answers"]]
    return dict(images=np.stack(images), objects=objects, boxes=boxes, questions=questions, answers=answers)


def question(shape: str) -> str:
    """The grid variant's wording (`leanvlp.data.shapes._colour_question`), for every object of a training image."""
    return f"what color is the {shape}?"


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> DINOv2's input (N, 3, S, S): ImageNet mean / std, as the asset's image processor, without
    its resize + centre crop (the images already have the tower's size, and a crop would cut the grid's border)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    return (x - mean[:, None, None]) / std[:, None, None]


def load_vision(s: dict[str, Any]) -> PreTrainedModel:
    """The frozen tower: the converted DINOv2-S asset, or (`vision="tiny"`, tests) a seeded random DINOv2."""
    if s["vision"] == "tiny":
        torch.manual_seed(1234)
        config = tiny_vision_config(image_size=s["image_size"], patch_size=14, hidden_size=TINY_VISION["hidden_size"],
                                    layers=TINY_VISION["layers"], heads=TINY_VISION["heads"], model_type="dinov2")
        return AutoModel.from_config(config).eval()
    from leanvlp import assets

    return AutoModel.from_pretrained(str(assets.prepare_dinov2_small(image_size=s["image_size"]))).eval()


def build_tokenizer() -> Any:
    from leanvlp.data.shapes import SHAPES

    return build_word_tokenizer([question(shape) for shape in SHAPES] + [" ".join(COLOURS)])


def build(s: dict[str, Any], vision: PreTrainedModel, tokenizer: Any, arm: str, seed: int
          ) -> MergeBridgeForConditionalGeneration:
    """The arm's MergeBridge with the tower's weights; every arm of a seed starts from the same weights (merging
    configs build no parameters, so the seeded init draws the same numbers)."""
    text_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s["llm_hidden"],
                              intermediate_size=4 * s["llm_hidden"],
                              num_hidden_layers=s["llm_layers"], num_attention_heads=s["llm_heads"],
                              num_key_value_heads=s["llm_heads"], max_position_embeddings=128,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, initializer_range=s["init_std"])
    config = MergeBridgeConfig(
        vision_config=vision.config, text_config=text_config,
        bridge_config=dict(hidden_size=s["bridge_hidden"], num_hidden_layers=s["bridge_layers"],
                           num_attention_heads=s["bridge_heads"], intermediate_size=4 * s["bridge_hidden"],
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        bridge_merging=dict(r=s["arms"][arm], mode="mean", prop_attn=False,
                            protect_relevant=s["guard"] if arm.startswith("guided") else 0),
        vision_feature_layer=s["vision_feature_layer"], vision_feature_norm=False,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), freeze_vision=True, freeze_llm=False,
    )
    torch.manual_seed(seed)
    model = MergeBridgeForConditionalGeneration(config)
    model.model.vision_tower.vision_model.load_state_dict(vision.state_dict())
    return model


def features_key(s: dict[str, Any]) -> str:
    keys = ("vision", "image_size", "vision_feature_layer", "train_images", "train_objects", "test_images",
            "data_seed")
    return hashlib.sha256(json.dumps({k: s[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def vision_features(model: MergeBridgeForConditionalGeneration, images: np.ndarray, batch_size: int = 32
                    ) -> torch.Tensor:
    """The tower's tokens the bridge reads (N, 65, C), through the model's own `get_image_features`."""
    model.eval()
    return torch.cat([model.get_image_features(pixels(images[i:i + batch_size])).last_hidden_state
                      for i in range(0, len(images), batch_size)])


def cached_features(s: dict[str, Any], model: MergeBridgeForConditionalGeneration, data: dict[str, Any],
                    cache_dir: Path) -> dict[str, Any]:
    """Train / test features, computed once per image and kept in `cache_dir` (the tower is frozen)."""
    path = cache_dir / f"features_{features_key(s)}.pt"
    if path.exists():
        return torch.load(path)
    start = time.process_time()
    out = {"train": vision_features(model, data["train"]["images"]),
           "test": vision_features(model, data["test"]["images"])}
    out["cpu_seconds_per_image"] = (time.process_time() - start) / (len(out["train"]) + len(out["test"]))
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


# ----------------------------------------------------------------------------- model on cached features


def encode(tokenizer: Any, num_image_tokens: int, questions: list[str], answers: list[str] | None
           ) -> dict[str, torch.Tensor]:
    """MergeBridgeProcessor's layout: BOS, <image> x M, the question, then (training) the answer and EOS as labels.
    Every question has the same number of words, so rows need no padding."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    rows, labels = [], []
    for i, text in enumerate(questions):
        ids = [tokenizer.bos_token_id] + [image_id] * num_image_tokens
        ids += tokenizer(text.removesuffix("?"), add_special_tokens=False)["input_ids"]  # the shape word last
        lab = [IGNORE] * len(ids)
        if answers is not None:
            target = tokenizer(answers[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, lab = ids + target, lab + target
        rows.append(ids)
        labels.append(lab)
    out = {"input_ids": torch.tensor(rows)}
    if answers is not None:
        out["labels"] = torch.tensor(labels)
    return out


def cached_forward(model: MergeBridgeForConditionalGeneration, input_ids: torch.Tensor, features: torch.Tensor,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`MergeBridgeForConditionalGeneration.forward` from the tower's cached tokens (B, 65, C): the model's own prompt
    text (labels never guide), bridge, LLM and head. Returns logits (B, L, V) and the next-token loss."""
    embeds = model.get_input_embeddings()(input_ids)  # (B, L, C)
    mask = input_ids == model.config.image_token_id  # (B, L)
    text = None
    if model.config.reads_prompt_text:
        text = prompt_embeds(embeds, mask, None, None if labels is None else labels == IGNORE)  # (B, C)
    prefix = model.model.bridge(features, text_embeds=text).last_hidden_state  # (B, M, C)
    embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), prefix.to(embeds.dtype))
    logits = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)  # (B, L, V)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    return logits, loss


def check_cached_path(model: MergeBridgeForConditionalGeneration, tokenizer: Any, split: dict[str, Any],
                      features: torch.Tensor, count: int = 4) -> tuple[float, float]:
    """The cached path's loss must equal the library's forward from pixels (fp32: ~1e-6 apart)."""
    batch = encode(tokenizer, model.config.num_image_tokens, split["questions"][:count], split["answers"][:count])
    model.eval()
    with torch.no_grad():
        library = float(model(**batch, pixel_values=pixels(split["images"][:count])).loss)
        cached = float(cached_forward(model, batch["input_ids"], features[:count], batch["labels"])[1])
    if abs(library - cached) > 1e-5:
        raise RuntimeError(f"cached-feature path disagrees with MergeBridge.forward: {cached} vs {library}")
    return library, cached


@torch.no_grad()
def evaluate(model: MergeBridgeForConditionalGeneration, tokenizer: Any, split: dict[str, Any],
             features: torch.Tensor, batch_size: int = 200) -> list[int]:
    """Per held-out question, 1 if the argmax over the colour words at the answer position is its answer."""
    model.eval()
    colours = torch.tensor(tokenizer.convert_tokens_to_ids(list(COLOURS)))
    truth = torch.tensor(tokenizer.convert_tokens_to_ids(split["answers"]))
    batch = encode(tokenizer, model.config.num_image_tokens, split["questions"], None)
    correct = []
    for i in range(0, len(truth), batch_size):
        logits, _ = cached_forward(model, batch["input_ids"][i:i + batch_size], features[i:i + batch_size])
        pred = colours[logits[:, -1, colours].argmax(-1)]
        correct += (pred == truth[i:i + batch_size]).int().tolist()
    model.train()
    return correct


# ----------------------------------------------------------------------------- one run


def training_pairs(split: dict[str, Any]) -> tuple[list[int], list[str], list[str]]:
    """Every object of every training image as one question: (image index, question, answer)."""
    index, questions, answers = [], [], []
    for i, objects in enumerate(split["objects"]):
        for shape, colour in objects:
            index.append(i)
            questions.append(question(shape))
            answers.append(colour)
    return index, questions, answers


def run(s: dict[str, Any], arm: str, seed: int, vision: PreTrainedModel, tokenizer: Any, data: dict[str, Any],
        feats: dict[str, Any], map_path: Path | None = None) -> dict[str, Any]:
    """Train one arm (`train_arm`); with `map_path`, draw the trained model's `protected_map` there."""
    model, record = train_arm(s, arm, seed, vision, tokenizer, data, feats)
    if map_path is not None:
        protected_map(model, tokenizer, data["test"], feats["test"], map_path)
    return record


def train_arm(s: dict[str, Any], arm: str, seed: int, vision: PreTrainedModel, tokenizer: Any, data: dict[str, Any],
              feats: dict[str, Any]) -> tuple[MergeBridgeForConditionalGeneration, dict[str, Any]]:
    """Train one arm from the seed's initial weights on the seed's data order: the model, its curve and costs."""
    model = build(s, vision, tokenizer, arm, seed)
    check = check_cached_path(model, tokenizer, data["test"], feats["test"])
    image_of, questions, answers = training_pairs(data["train"])
    train = encode(tokenizer, model.config.num_image_tokens, questions, answers)
    image_of = torch.tensor(image_of)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["learning_rate"], weight_decay=s["weight_decay"])
    warmup = max(1, int(s["warmup"] * s["steps"]))

    def lr_factor(k: int) -> float:  # linear warm-up, then cosine decay to 0 at the last step
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + float(np.cos(np.pi * (k - warmup) / max(1, s["steps"] - warmup))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = torch.Generator().manual_seed(seed)
    curve, losses, cpu, eval_cpu = [], [], 0.0, 0.0

    def record(step: int) -> list[int]:
        nonlocal eval_cpu
        start = time.process_time()
        correct = evaluate(model, tokenizer, data["test"], feats["test"])
        eval_cpu += time.process_time() - start
        curve.append({"step": step, "accuracy": sum(correct) / len(correct), "train_cpu_seconds": round(cpu, 3),
                      "loss": round(statistics.mean(losses), 5) if losses else None})
        losses.clear()
        print(f"    {arm} seed {seed} step {step:5d}  {cpu:7.1f}s cpu  loss {curve[-1]['loss']}  accuracy "
              f"{curve[-1]['accuracy']:.3f}", flush=True)
        return correct

    correct = record(0)
    model.train()
    for step in range(1, s["steps"] + 1):
        start = time.process_time()
        idx = torch.randint(len(image_of), (s["batch_size"],), generator=order)
        _, loss = cached_forward(model, train["input_ids"][idx], feats["train"][image_of[idx]], train["labels"][idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        cpu += time.process_time() - start
        if step % s["eval_every"] == 0 or step == s["steps"]:
            correct = record(step)
    return model, {"arm": arm, "seed": seed, "settings": s, "num_image_tokens": model.config.num_image_tokens,
            "token_counts": model.config.bridge_merging_config.token_counts(model.config.num_bridge_input_tokens,
                                                                            s["bridge_layers"]),
            "num_trainable_parameters": sum(p.numel() for p in params), "check_loss": check, "curve": curve,
            "final_accuracy": curve[-1]["accuracy"], "final_correct": correct, "eval_cpu_seconds": round(eval_cpu, 3)}


@torch.no_grad()
def first_block_guard(model: MergeBridgeForConditionalGeneration, tokenizer: Any, questions: list[str],
                      features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the bridge's first merging block guards (B, N) bool (the `protect_relevant` most relevant tokens
    above their image's mean, `relevant_guard`) for these questions, and the prompt's text embeddings (B, C)."""
    from leanvlp.modeling.token_merging import relevant_guard

    ids = encode(tokenizer, model.config.num_image_tokens, questions, None)["input_ids"]
    text = prompt_embeds(model.get_input_embeddings()(ids), ids == model.config.image_token_id)  # (B, C)
    relevance = model.model.bridge.text_relevance(features, text)  # (B, N)
    merging = model.config.bridge_merging_config
    a_start, b_start = merging.protected + merging.protected % 2, merging.protected + 1 - merging.protected % 2
    guard_a, guard_b = relevant_guard(relevance, merging.protected, merging.protect_relevant, a_start, b_start)
    guarded = torch.zeros(relevance.shape, dtype=torch.bool)
    guarded[:, a_start::2], guarded[:, b_start::2] = guard_a, guard_b
    return guarded, text


def asked_patches(split: dict[str, Any], b: int, grid: int, image_size: int) -> set[int]:
    """Patch indices (row-major, CLS excluded) that the asked object's box overlaps in image `b`."""
    shape = split["questions"][b].removeprefix("what color is the ").removesuffix("?")
    x, y, w, h = split["boxes"][b][[o[0] for o in split["objects"][b]].index(shape)]
    step = image_size / grid
    cols = range(int(x // step), int(min(grid - 1, (x + w - 1e-6) // step)) + 1)
    rows = range(int(y // step), int(min(grid - 1, (y + h - 1e-6) // step)) + 1)
    return {r * grid + c for r in rows for c in cols}


def guard_hits(model: MergeBridgeForConditionalGeneration, tokenizer: Any, split: dict[str, Any],
               features: torch.Tensor) -> dict[str, float]:
    """How often the first block's guarded patches touch the asked object, against guarding k random patches."""
    from math import comb

    guarded, _ = first_block_guard(model, tokenizer, split["questions"], features)
    lead = model.config.bridge_merging_config.protected
    patches = guarded.shape[1] - lead
    grid = int(round(patches ** 0.5))
    hits, chance, counts = [], [], []
    for b in range(len(split["questions"])):
        target = asked_patches(split, b, grid, split["images"].shape[1])
        picked = set(guarded[b, lead:].nonzero()[:, 0].tolist())
        hits.append(bool(picked & target))
        k = len(picked)
        chance.append(1 - comb(patches - len(target), k) / comb(patches, k) if k else 0.0)
        counts.append(k)
    return {"hit_rate": float(np.mean(hits)), "chance": float(np.mean(chance)),
            "mean_guarded": float(np.mean(counts)), "images": len(hits)}


@torch.no_grad()
def protected_map(model: MergeBridgeForConditionalGeneration, tokenizer: Any, split: dict[str, Any],
                  features: torch.Tensor, path: Path, count: int = 4, cell: int = 28) -> None:
    """Per held-out image: the image with the asked object's box (green) and the patches the trained guided bridge's
    first merging block guards (red), over its `merge_map` (final token groups, mean colour)."""
    from PIL import ImageDraw

    from leanvlp.visualize import merge_map

    model.eval()
    guarded, text = first_block_guard(model, tokenizer, split["questions"][:count], features[:count])
    out = model.model.bridge(features[:count], text_embeds=text, track_sources=True)
    lead = model.config.bridge_merging_config.protected
    grid = int(round((guarded.shape[1] - lead) ** 0.5))
    side = grid * cell
    sheet = PIL.Image.new("RGB", (count * (side + 4) - 4, 2 * side + 4), (255, 255, 255))
    for b in range(count):
        image = PIL.Image.fromarray(split["images"][b]).resize((side, side), PIL.Image.NEAREST)
        groups = merge_map(split["images"][b], out.sources[b], path, grid=(grid, grid), cell=cell).copy()
        scale = side / split["images"].shape[1]
        shape = split["questions"][b].removeprefix("what color is the ").removesuffix("?")
        x, y, w, h = split["boxes"][b][[o[0] for o in split["objects"][b]].index(shape)]
        for panel in (image, groups):
            draw = ImageDraw.Draw(panel)
            draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=(0, 255, 0),
                           width=2)
            for patch in guarded[b, lead:].nonzero()[:, 0].tolist():
                r, c = divmod(patch, grid)
                draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 0, 0),
                               width=3)
        ImageDraw.Draw(image).text((3, 2), shape + "?", fill=(255, 255, 255))
        sheet.paste(image, (b * (side + 4), 0))
        sheet.paste(groups, (b * (side + 4), side + 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    model.train()


# ----------------------------------------------------------------------------- speed cost


@torch.no_grad()
def guidance_cost(s: dict[str, Any], vision: PreTrainedModel, tokenizer: Any, data: dict[str, Any],
                  feats: dict[str, Any], repeats: int = 20) -> dict[str, Any]:
    """Guided / plain forward CPU time at equal r with the same weights, the two interleaved (a busy machine slows
    both alike): on cached features (bridge + LLM, batch 64) at every guided token count (17 and 9), and from pixels
    (tower included, batch 16, half the repeats) at the smallest. Per-repeat ratios: min / median / max."""
    out: dict[str, Any] = {}
    counts = sorted({int(arm.split()[1]) for arm in s["arms"] if arm.startswith("guided")}, reverse=True)
    cases = [(t, False, 64, repeats) for t in counts] + [(counts[-1], True, 16, max(3, repeats // 2))]
    for tokens, from_pixels, batch, reps in cases:
        plain = build(s, vision, tokenizer, f"plain {tokens}", 0).eval()
        guided = build(s, vision, tokenizer, f"guided {tokens}", 0).eval()
        guided.load_state_dict(plain.state_dict())
        ids = encode(tokenizer, plain.config.num_image_tokens, data["test"]["questions"][:batch], None)["input_ids"]
        pix, fts = pixels(data["test"]["images"][:batch]), feats["test"][:batch]
        times: dict[str, list[float]] = {"plain": [], "guided": []}
        for rep in range(reps + 1):  # the first round warms up
            for name, model in (("plain", plain), ("guided", guided)) if rep % 2 else (("guided", guided),
                                                                                      ("plain", plain)):
                start = time.process_time()
                if from_pixels:
                    model(input_ids=ids, pixel_values=pix)
                else:
                    cached_forward(model, ids, fts)
                if rep:
                    times[name].append(time.process_time() - start)
        ratios = [g / p for g, p in zip(times["guided"], times["plain"])]
        out[f"{tokens} {'pixels' if from_pixels else 'cached'}"] = {
            "batch": batch, "repeats": reps, "plain_ms": 1e3 * statistics.median(times["plain"]),
            "guided_ms": 1e3 * statistics.median(times["guided"]),
            "ratio": [min(ratios), statistics.median(ratios), max(ratios)]}
    return out


# ----------------------------------------------------------------------------- report


def blind_baselines(data: dict[str, Any]) -> dict[str, float]:
    """Image-blind accuracy on the held-out questions: the most common training colour, and per asked shape."""
    _, questions, answers = training_pairs(data["train"])
    overall = max(set(answers), key=answers.count)
    per_shape = {q: max(set(a for qq, a in zip(questions, answers) if qq == q),
                        key=[a for qq, a in zip(questions, answers) if qq == q].count) for q in set(questions)}
    test = data["test"]
    return {"prior": float(np.mean([a == overall for a in test["answers"]])),
            "prior_per_shape": float(np.mean([a == per_shape[q] for q, a in zip(test["questions"], test["answers"])])),
            "chance": 1 / len(COLOURS)}


def load_runs(runs_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(runs_dir.glob("*_seed*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["arm"], {})[record["seed"]] = record
    return runs


def verdict(bounds: tuple[float, float] | None) -> str:
    if bounds is None:
        return "inconclusive (fewer than 2 paired seeds)"
    if bounds[0] > 0:
        return "held"
    if bounds[1] < 0:
        return "did not hold (guided below plain)"
    return "inconclusive"


def report(runs: dict[str, dict[int, dict[str, Any]]], blind: dict[str, float], cost: dict[str, Any] | None,
           guard: dict[str, Any] | None = None) -> str:
    lines = [BEGIN, "", "# Text-guided merging in MergeBridge: accuracy at equal visual-token counts (issue #16)", ""]
    if not runs:
        return "\n".join(lines + ["No finished run yet.", "", END])
    s = next(iter(next(iter(runs.values())).values()))["settings"]
    lines += [
        f"Shapes grid variant at {s['image_size']} px: six small shapes per image, the question asks one's colour. "
        f"Frozen pretrained DINOv2-S ({s['vision']}, 65 tokens, features cached once per image) -> MergeBridge bridge "
        f"({s['bridge_layers']} layers, width {s['bridge_hidden']}) -> {s['llm_layers']}-layer Llama (width "
        f"{s['llm_hidden']}) from scratch; {s['train_images']} training images ({min(s['train_objects'])}-"
        f"{max(s['train_objects'])} objects, one question per object), {s['steps']} "
        f"steps of batch {s['batch_size']}, lr {s['learning_rate']}; accuracy on {s['test_images']} held-out "
        f"questions. Guided = `protect_relevant={s['guard']}`. Per seed every arm starts from the same weights and "
        "sees the same data order. Written by `benchmarks/text_guided_merging.py` from the JSON files in "
        "`benchmarks/results/evidence/text_guided/`; plot: `text_guided_merging.png` (band = min..max over seeds).",
        "",
        f"Image-blind control: the most common training colour scores {blind['prior']:.3f} on the held-out questions, "
        f"the most common colour per asked shape {blind['prior_per_shape']:.3f} (chance {blind['chance']:.3f}).", "",
        "| arm | visual tokens | seeds | final accuracy (mean ± sd) | per seed | training CPU s per run |",
        "|---|---|---|---|---|---|"]
    for arm in s["arms"]:
        got = runs.get(arm, {})
        if not got:
            continue
        seeds = sorted(got)
        finals = [got[k]["final_accuracy"] for k in seeds]
        cpu = [got[k]["curve"][-1]["train_cpu_seconds"] for k in seeds]
        lines.append(f"| {arm} | {got[seeds[0]]['num_image_tokens']} | {len(seeds)} | {mean_sd(finals)} | "
                     f"{', '.join(f'{a:.3f}' for a in finals)} | {mean_sd(cpu, 0)} |")
    lines += ["", "Paired differences over seeds (final accuracy; 95% t-interval of the mean):", "",
              "| comparison | seeds | mean ± sd | 95% interval | verdict |", "|---|---|---|---|---|"]
    verdicts = []
    pairs = [(f"guided {t} - plain {t}", f"guided {t}", f"plain {t}", True) for t in (17, 9)]
    pairs += [(f"unmerged - plain {t}", "unmerged", f"plain {t}", False) for t in (17, 9)]
    for name, a, b, claim in pairs:
        seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
        if not seeds:
            continue
        diffs = [runs[a][k]["final_accuracy"] - runs[b][k]["final_accuracy"] for k in seeds]
        bounds = interval(diffs)
        text = verdict(bounds) if claim else "reference: positive = merging costs accuracy"
        span = "-" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"
        lines.append(f"| {name} | {len(seeds)} | {mean_sd(diffs)} | {span} | {text} |")
        if claim:
            verdicts.append(f"- {name.split(' - ')[0].replace('guided', 'at')} visual tokens: {text} "
                            f"(guided minus plain {statistics.mean(diffs):+.3f}, 95% interval {span})")
    means = {arm: statistics.mean(r["final_accuracy"] for r in got.values()) for arm, got in runs.items() if got}
    notes = []
    if means and min(means.values()) > blind["prior_per_shape"]:
        notes.append(f"Every arm ends above the image-blind control ({blind['prior_per_shape']:.3f}): the models "
                     "read the image.")
    plain = [m for arm, m in means.items() if arm.startswith("plain")]
    if "unmerged" in means and plain and means["unmerged"] < min(plain):
        notes.append("The unmerged model is no ceiling within this budget: it ends below plain merging at every "
                     "count (65 visual tokens learn more slowly than 17 or 9 in the same steps), so the comparison "
                     "is between under-trained models.")
    lines += ["", "Verdicts (the claim: at equal visual-token counts, guided merging answers more questions "
              "correctly than plain merging):", "", *verdicts, "", *notes, ""]
    if guard:
        k = s["guard"]
        lines += [f"Where the guidance looks (seed 0's trained guided models, retrained with `--guard` and checked "
                  f"equal to their JSON): the patches the first merging block guards (k = {k}) touch the asked "
                  "object's box in " + ", ".join(f"{v['hit_rate']:.1%} ({arm})" for arm, v in guard.items())
                  + f" of the held-out images; {k} random patches would in "
                  + ", ".join(f"{v['chance']:.1%}" for v in guard.values()) + ". The map "
                  "`text_guided_merging_merge_map.png` shows four of them (top: image, asked object in green, "
                  "guarded patches in red; bottom: the final token groups).", ""]
    if cost:
        lines += ["Speed cost of the guidance (guided / plain forward at equal r, same weights; process CPU time, "
                  "one thread, runs interleaved; ratio min / median / max over repeats):", "",
                  "| tokens | path | batch | repeats | plain ms (median) | guided ms (median) "
                  "| ratio min / median / max |",
                  "|---|---|---|---|---|---|---|"]
        for key, c in cost.items():
            tokens, path = key.split()
            where = "bridge + LLM on cached features" if path == "cached" else "whole model from pixels"
            lines.append(f"| {tokens} | {where} | {c['batch']} | {c['repeats']} | {c['plain_ms']:.1f} | "
                         f"{c['guided_ms']:.1f} | {c['ratio'][0]:.3f} / {c['ratio'][1]:.3f} / {c['ratio'][2]:.3f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, dict[str, Any]]], blind: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, got in runs.items():
        n = min(len(r["curve"]) for r in got.values())
        steps = [p["step"] for p in next(iter(got.values()))["curve"][:n]]
        y = np.array([[p["accuracy"] for p in r["curve"][:n]] for r in got.values()])
        left.plot(steps, y.mean(0), label=f"{arm} ({len(got)} seeds)")
        left.fill_between(steps, y.min(0), y.max(0), alpha=0.15)
    for ax in (left, right):
        ax.axhline(blind["prior_per_shape"], color="grey", linestyle=":", label="image-blind (colour prior per shape)")
        ax.grid(alpha=0.3)
    left.set_xlabel("training step")
    left.set_ylabel("held-out accuracy")
    left.legend(fontsize=7)
    for kind, marker in (("plain", "o"), ("guided", "s")):
        xs = [t for t in (9, 17) if runs.get(f"{kind} {t}")]
        if not xs:
            continue
        finals = [[r["final_accuracy"] for r in runs[f"{kind} {t}"].values()] for t in xs]
        mean = np.array([np.mean(f) for f in finals])
        low, high = mean - np.array([min(f) for f in finals]), np.array([max(f) for f in finals]) - mean
        right.errorbar(xs, mean, yerr=[low, high], marker=marker, capsize=4, label=f"{kind} merging")
    if runs.get("unmerged"):
        finals = [r["final_accuracy"] for r in runs["unmerged"].values()]
        right.axhline(np.mean(finals), color="black", linestyle="--", label="unmerged (65 tokens)")
        right.axhspan(min(finals), max(finals), color="black", alpha=0.08)
    right.set_xticks([9, 17])
    right.set_xlabel("visual tokens the LLM reads")
    right.set_ylabel("held-out accuracy (bars: min..max)")
    right.legend(fontsize=7)
    fig.suptitle("Text-guided vs plain merging in the MergeBridge bridge (DINOv2-S, shapes grid variant)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(runs_dir: Path, report_path: Path, plot_path: Path) -> None:
    """The report section and the plot from the run, control (blind.json) and cost JSON files in `runs_dir`."""
    cost_path = runs_dir / "cost.json"
    cost = json.loads(cost_path.read_text()) if cost_path.exists() else None
    blind = json.loads((runs_dir / "blind.json").read_text())
    guard_path = runs_dir / "guard.json"
    guard = json.loads(guard_path.read_text()) if guard_path.exists() else None
    runs = load_runs(runs_dir)
    section = report(runs, blind, cost, guard)
    text = report_path.read_text() if report_path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = section + "\n"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    if runs:
        plot(runs, blind, plot_path)


# ----------------------------------------------------------------------------- main


def prepare(s: dict[str, Any], cache_dir: Path) -> tuple[PreTrainedModel, Any, dict[str, Any], dict[str, Any]]:
    """Tower, tokenizer, data (train from index 0, test right after) and the cached features."""
    vision = load_vision(s)
    tokenizer = build_tokenizer()
    data = {"train": shapes_split(s, s["train_images"], 0, s["train_objects"]),
            "test": shapes_split(s, s["test_images"], s["train_images"], [6])}
    feats = cached_features(s, build(s, vision, tokenizer, "unmerged", 0), data, cache_dir)
    return vision, tokenizer, data, feats


def run_all(s: dict[str, Any], arms: list[str], seeds: list[int], runs_dir: Path, cache_dir: Path,
            report_path: Path | None = None, plot_path: Path | None = None, map_path: Path | None = None,
            cost_repeats: int = 20, force: bool = False) -> dict[str, dict[int, dict[str, Any]]]:
    """Every missing (arm, seed) run, seed by seed (a partial set holds complete pairs), then the speed cost."""
    vision, tokenizer, data, feats = prepare(s, cache_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "blind.json").write_text(json.dumps(blind_baselines(data), indent=1) + "\n")
    for seed in seeds:
        for arm in arms:
            path = runs_dir / f"{arm.replace(' ', '_')}_seed{seed}.json"
            if path.exists() and not force:
                if json.loads(path.read_text())["settings"] != json.loads(json.dumps(s)):
                    raise SystemExit(f"{path} was run with other settings; delete it or pass --force")
                print(f"skip {arm} seed {seed}: {path.name} exists", flush=True)
                continue
            print(f"run {arm} seed {seed}", flush=True)
            draw = map_path if (arm, seed) == (s["map_arm"], seeds[0]) else None
            path.write_text(json.dumps(run(s, arm, seed, vision, tokenizer, data, feats, draw), indent=1) + "\n")
            if report_path is not None:
                write_report(runs_dir, report_path, plot_path)
    cost_path = runs_dir / "cost.json"
    if cost_repeats and (force or not cost_path.exists()):
        cost_path.write_text(json.dumps(guidance_cost(s, vision, tokenizer, data, feats, cost_repeats), indent=1))
    if report_path is not None:
        write_report(runs_dir, report_path, plot_path)
    return load_runs(runs_dir)


def without_timing(value: Any) -> Any:
    """A run record (as JSON) without its CPU-second fields: what the same seed must reproduce exactly."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in ("train_cpu_seconds", "eval_cpu_seconds")}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def guard_study(s: dict[str, Any], runs_dir: Path, cache_dir: Path, map_path: Path) -> dict[str, Any]:
    """Retrain each guided arm of the first seed (the same numbers as its JSON, checked), measure where its guard
    looks (`guard_hits`, into guard.json) and draw the map arm's `protected_map`."""
    vision, tokenizer, data, feats = prepare(s, cache_dir)
    out = {}
    for arm in [a for a in s["arms"] if a.startswith("guided")]:
        stored = json.loads((runs_dir / f"{arm.replace(' ', '_')}_seed0.json").read_text())
        model, record = train_arm(s, arm, 0, vision, tokenizer, data, feats)
        if without_timing(json.loads(json.dumps(record))) != without_timing(stored):
            raise RuntimeError(f"{arm} seed 0 retrained differs from its JSON: not deterministic")
        out[arm] = guard_hits(model, tokenizer, data["test"], feats["test"])
        print(f"{arm}: reproduced its JSON exactly; guard {out[arm]}", flush=True)
        if arm == s["map_arm"]:
            protected_map(model, tokenizer, data["test"], feats["test"], map_path)
    (runs_dir / "guard.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated among {list(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="override the settings' steps (pilots)")
    parser.add_argument("--pilot", action="store_true", help="no report, no cost; use with --runs-dir and --steps")
    parser.add_argument("--report", action="store_true", help="only rewrite the tables and the plot")
    parser.add_argument("--force", action="store_true", help="rerun finished runs too")
    parser.add_argument("--guard", action="store_true", help="retrain seed 0's guided arms (checked equal to their "
                        "JSON): where the guard looks, and the merge map")
    parser.add_argument("--runs-dir", type=Path, default=RUNS)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "leanvlp" / "text_guided_features")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; known {list(ARMS)}")
    s = dict(SETTINGS, **({"steps": args.steps} if args.steps else {}))
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.report:
        write_report(args.runs_dir, REPORT, PLOT)
        return 0
    if args.guard:
        guard_study(s, args.runs_dir, args.cache_dir, MERGE_MAP)
        write_report(args.runs_dir, REPORT, PLOT)
        return 0
    if args.pilot:
        run_all(s, arms, seeds, args.runs_dir, args.cache_dir, cost_repeats=0, force=args.force)
        return 0
    run_all(s, arms, seeds, args.runs_dir, args.cache_dir, REPORT, PLOT, MERGE_MAP, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
