"""`eval.py` / `leanvlp-eval`: quality and speed of a saved leanvlp model, into eval_results.json and its card.

    python eval.py --model DIR --task caption                    # shapes held-out images, BLEU / CIDEr-D / ROUGE-L
    python eval.py --model DIR --task vqa --data coco --data_path /data/coco --split val2017
    python eval.py --model DIR --task retrieval --num_images 100
    python eval.py --model DIR --task speed --sweep 0,4,8,16     # on vs off, plus a speed-vs-quality PNG

Tasks
- caption: greedy (or beam) captions of held-out images -> BLEU-1..4, CIDEr-D, ROUGE-L (`leanvlp.metrics`), and
  the teacher-forced token accuracy on each image's first reference caption.
- vqa: an answer to every question of every image (the family's VQA prompt) -> VQA soft accuracy.
- retrieval: R@1/5/10 in both directions and their mean. MergeBridge is generative, so this is
  **likelihood-based retrieval**: score[i, j] = the mean log-likelihood of caption j (its tokens and EOS) given
  image i; every caption of an image counts as a positive. PatchAlign: ITC similarity for every pair, each row's
  top-k re-ranked by the ITM head; with boxes in the data also `pta_precision`, the patch detector's R-precision.
- speed: the family's technique on and off side by side, same weights (MergeBridge: bridge merging at the
  config's r vs r=0; PatchAlign: the patch detector at the config's keep ratio vs 1.0, which equals no pruning): FLOPs per image of the image encoding and of one full caption forward
  (`torch.utils.flop_counter`), visual tokens at each stage, throughput (warm-up, then the median of repeats) and
  peak memory. `--sweep 0,4,8` also measures speed and caption CIDEr-D for each value (MergeBridge: r) and draws
  `speed_quality.png` in the model folder (PatchAlign: keep ratios, e.g. `--sweep 1.0,0.7,0.5,0.3`).

Peak memory is the extra memory a call needs over the loaded model and its inputs. CUDA:
`torch.cuda.max_memory_allocated()` during the call minus the allocation before it. CPU (PyTorch keeps no CPU
allocator statistics): the peak total size of the tensor storages created inside the call that are alive at the
same time, tracked op by op with a TorchDispatchMode (`LiveTensorBytes`); kernel workspace that never becomes a
tensor is not seen.

Data: `--data shapes` builds held-out images from index 1,000,000 on (training uses the first indices), `coco`
reads a COCO folder and `hf` any `datasets` dataset (see `leanvlp.data`); the first `--num_images` images are used.

Each run replaces the entry with the same task, dataset and split in `DIR/eval_results.json` (format in
`leanvlp.model_card`), keeps the others, and regenerates `DIR/README.md`, so the card's model-index always equals
the file.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .metrics import caption_metrics, retrieval_recall, vqa_accuracy
from .model_card import FAMILIES, card_kwargs_from_folder, parse_eval_results, read_config, write_model_card
from .training import DataArguments, MergeBridgeCollator, decode_image, load_schema_data, to_pairs

TASKS = ("caption", "vqa", "retrieval", "speed")
DATA_KINDS = ("shapes", "coco", "hf")
HELD_OUT_START = 1_000_000  # first shapes index of eval images: never among the training images
DEFAULT_SPLITS = {"shapes": "held-out", "coco": "val2017", "hf": "validation"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


# ----------------------------------------------------------------------------- arguments


@dataclass
class EvalArguments:
    """What to evaluate, on what, how. `python eval.py --help` lists them."""

    model: str = field(metadata={"help": "folder written by save_pretrained / train.py"})
    task: str = field(metadata={"help": f"one of {TASKS}"})
    data: str = field(default="shapes", metadata={"help": f"one of {DATA_KINDS}"})
    data_path: str | None = field(default=None, metadata={"help": "COCO folder, or datasets path / hub id"})
    split: str | None = field(default=None, metadata={"help": f"split to evaluate (defaults: {DEFAULT_SPLITS})"})
    image_column: str = "image"
    caption_column: str | None = None
    num_images: int = field(default=100, metadata={"help": "evaluate the first N images"})
    batch_size: int = 32
    max_new_tokens: int = 20
    num_beams: int = 1
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    dtype: str = field(default="fp32", metadata={"help": f"one of {tuple(DTYPES)}"})
    sweep: str | None = field(default=None, metadata={"help": "speed task: comma-separated values, e.g. '0,4,8,16'"})
    warmup: int = field(default=1, metadata={"help": "untimed calls before timing"})
    repeats: int = field(default=5, metadata={"help": "timed calls; throughput uses their median"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task: unknown task {self.task!r}; choose one of {TASKS}")
        if self.data not in DATA_KINDS:
            raise ValueError(f"--data: unknown dataset kind {self.data!r}; choose one of {DATA_KINDS}")
        if self.data != "shapes" and self.data_path is None:
            raise ValueError(f"--data {self.data}: --data_path is required")
        for name in ("num_images", "batch_size", "max_new_tokens", "num_beams", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.sweep is not None and self.task != "speed":
            raise ValueError(f"--sweep goes with --task speed (got --task {self.task})")
        if self.split is None:
            self.split = DEFAULT_SPLITS[self.data]

    @property
    def sweep_values(self) -> list[int | float]:
        """'0,4,8' -> [0, 4, 8] (MergeBridge r); '1.0,0.5' -> [1.0, 0.5] (PatchAlign keep ratio)."""
        if self.sweep is None:
            return []
        parts = [v.strip() for v in self.sweep.split(",") if v.strip()]
        try:
            values = [float(v) if "." in v else int(v) for v in parts]
        except ValueError:
            values = []
        if not values or any(v < 0 for v in values):
            raise ValueError(f"--sweep: expected comma-separated integers (MergeBridge r, e.g. '0,4,8,16') or keep "
                             f"ratios (PatchAlign, e.g. '1.0,0.7,0.5'), got {self.sweep!r}")
        return values


# ----------------------------------------------------------------------------- data


def load_eval_data(args: EvalArguments, image_size: int) -> Dataset:
    """The first `num_images` images of the eval set, in leanvlp's row schema; an empty set is an error."""
    if args.data == "shapes":
        from .data import make_shapes_dataset

        return make_shapes_dataset(args.num_images, image_size=max(image_size, 32), start_index=HELD_OUT_START)
    data_args = DataArguments(dataset=args.data, data_path=args.data_path, train_split=args.split, eval_split=None,
                              image_column=args.image_column, caption_column=args.caption_column)
    data, _ = load_schema_data(data_args, image_size)
    if len(data) == 0:
        raise ValueError(f"dataset {args.data_path!r} (split {args.split!r}) is empty: no images to evaluate")
    return data.select(range(min(args.num_images, len(data))))


def dataset_id(args: EvalArguments) -> str:
    """The dataset's name in eval_results.json (the same as train.py writes)."""
    return "leanvlp/shapes" if args.data == "shapes" else str(args.data_path)


def eval_rows(data: Dataset | None, task: str, limit: int) -> Dataset | None:
    """One row per image (its first caption / question) from an eval split, at most `limit`."""
    if data is None or len(data) == 0:
        return None
    pairs = to_pairs(data.select(range(min(limit, len(data)))), task)
    first = {}
    for i, image_id in enumerate(pairs["image_id"]):
        first.setdefault(image_id, i)
    return pairs.select(sorted(first.values()))


def task_rows(data: Dataset, task: str) -> Dataset:
    """Rows to generate for: one per image (caption) or one per question (vqa); names what is missing."""
    if task == "vqa":
        rows = to_pairs(data, "vqa")
        if len(rows) == 0:
            raise ValueError(f"task 'vqa' needs the fields 'questions' and 'answers', but none of the {len(data)} "
                             "images has a question")
        return rows
    rows = eval_rows(data, "caption", len(data))
    if rows is None or len(rows) == 0:
        raise ValueError(f"task {task!r} needs the field 'captions', but none of the {len(data)} images has a caption")
    return rows


def images_and_captions(data: Dataset) -> tuple[list[PIL.Image.Image], list[str], list[int]]:
    """Decoded images, every caption, and the image each caption belongs to (for retrieval)."""
    if "captions" not in (data.column_names or []):
        raise ValueError(f"retrieval needs the field 'captions'; the dataset has {sorted(data.column_names or [])}")
    data = data.cast_column("image", ImageFeature(decode=False))
    images, texts, owner = [], [], []
    for row in data:
        if not row["captions"]:
            continue  # an image without captions has no positive: leave it out of both directions
        images.append(decode_image(row["image"], row["image_id"]))
        texts += list(row["captions"])
        owner += [len(images) - 1] * len(row["captions"])
    if not images:
        raise ValueError(f"task 'retrieval' needs the field 'captions', but none of the {len(data)} images has one")
    return images, texts, owner


# ----------------------------------------------------------------------------- measuring


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any,
                out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch counts its CUDA attention kernels but not the CPU flash kernel that SDPA uses on CPU; give that one the
# same formula, so CPU and CUDA counts agree.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions and attention; a multiply-add counts 2)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


class LiveTensorBytes(TorchDispatchMode):
    """Peak total bytes of the tensor storages created inside the mode and alive at the same time.

    Every op's output storage that is new (not one of the op's inputs, so views and in-place results are not
    counted twice) is added when created and subtracted when freed (a finalizer on the storage). Weights and
    inputs that exist before the mode starts are not counted: this is the extra memory the call needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self._alive:
                continue
            self._alive.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Extra bytes one call of `fn` needs at its peak (see the module docstring for what is measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def memory_measure(device: torch.device) -> str:
    """One line saying what `peak_memory` measures on `device`."""
    if device.type == "cuda":
        return "CUDA max_memory_allocated during the call minus the allocation before it"
    return "peak bytes of tensors created during the call and alive at once (TorchDispatchMode; CPU)"


def images_per_second(calls: Sequence[Callable[[], Any]], num_images: int, device: torch.device, warmup: int,
                      repeats: int) -> list[float]:
    """Throughput of each call: `num_images` / the median of `repeats` timed runs, after `warmup` untimed ones.

    The calls are timed in turns (A B A B ...), so a change in machine load hits all of them alike.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, timed in zip(calls, times):
            sync()
            start = time.perf_counter()
            call()
            sync()
            timed.append(time.perf_counter() - start)
    return [num_images / statistics.median(timed) for timed in times]


# ----------------------------------------------------------------------------- MergeBridge


def _to_model(batch: Any, model: Any) -> Any:
    """A processor batch on the model's device, floating tensors (pixels) in the model's dtype."""
    return batch.to(model.device).to(model.dtype)


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
        inputs = _to_model(processor(images=images, text=prompts), model)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams)
        predictions += processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        references += [r["references"] for r in batch_rows]
        forced = _to_model(processor(images=images, text=prompts, targets=[r["target"] for r in batch_rows]), model)
        logits = model(**forced).logits[:, :-1]
        labels = forced["labels"][:, 1:]
        keep = labels != -100
        correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
    model.train(was_training)
    report = {"token_accuracy": correct / max(total, 1)}
    if task == "vqa":
        report["vqa_accuracy"] = vqa_accuracy(predictions, references)
    else:
        report.update(caption_metrics(predictions, references))
    report["example"] = predictions[0] if predictions else ""
    report["images"] = len(predictions)
    return report


@torch.no_grad()
def caption_log_likelihoods(model: Any, processor: Any, images: Sequence[PIL.Image.Image], texts: Sequence[str],
                            batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """(num_images, num_texts) float32: mean log-likelihood of text j (its tokens and EOS) as the caption of image i.

    The score matrix of likelihood-based retrieval. Visual prefixes are computed once per image and the texts
    tokenised once; each (image, text) pair is then one LLM sequence, scored in batches of `batch_size` pairs.
    """
    prompt = processor.build_prompt("caption")
    # The token layout of a pair does not depend on its image: tokenise every text once (with a stand-in image,
    # whose pixels are not used).
    tokens = processor(images=[images[0]] * len(texts), text=[prompt] * len(texts), targets=list(texts))
    input_ids = tokens["input_ids"].to(model.device)  # (T, L)
    attention_mask = tokens["attention_mask"].to(model.device)  # (T, L)
    targets = tokens["labels"][:, 1:].to(model.device)  # (T, L-1): next-token targets, -100 off the caption
    features = []
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(list(images[start:start + batch_size]), return_tensors="pt")["pixel_values"]
        features.append(model.get_image_features(pixels.to(model.device, model.dtype)))  # (b, M, C)
    features = torch.cat(features)  # (I, M, C)

    pairs = torch.cartesian_prod(torch.arange(len(images)), torch.arange(len(texts)))  # (I*T, 2), text fastest
    scores = torch.empty(len(pairs), dtype=torch.float32)
    embed = model.get_input_embeddings()
    for start in tqdm(range(0, len(pairs), batch_size), desc="retrieval pairs", unit="batch", disable=not progress):
        image_idx, text_idx = pairs[start:start + batch_size].to(model.device).unbind(1)
        ids = input_ids[text_idx]  # (b, L)
        embeds = embed(ids)  # (b, L, C)
        slots = (ids == processor.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, features[image_idx].to(embeds.dtype))
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask[text_idx]).logits[:, :-1].float()
        target = targets[text_idx]  # (b, L-1)
        keep = target != -100
        logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (b, L-1)
        scores[start:start + len(ids)] = ((logp * keep).sum(1) / keep.sum(1)).cpu()
    return scores.view(len(images), len(texts))


class _SpeedCalls:
    """The forward and generate calls the speed task times, shared by every family's evaluator."""

    model: Any

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(**batch["forward"])

    def generate(self, batch: dict[str, Any], max_new_tokens: int, num_beams: int) -> torch.Tensor:
        # A fixed length (min = max new tokens), so every setting decodes the same number of steps.
        return self.model.generate(**batch["generate"], max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                   do_sample=False, num_beams=num_beams)


class MergeBridgeEvaluator(_SpeedCalls):
    """MergeBridge: captions and answers by generation, likelihood-based retrieval, bridge merging on vs off.

    The technique knob is the bridge's merges per layer r: merging changes no parameters, so "merging off" is the
    same weights with r = 0 (the LLM then reads every vision token).

    A family's evaluator (see EVALUATORS) provides: `from_pretrained`, `image_size`; quality: `generate_report`,
    `retrieval_scores`, `retrieval_method`, `retrieval_extras`; the technique: `knob`, `settings`, `setting`,
    `knob_value`, `check_sweep`; speed: `batch`, `encode`,
    `forward`, `generate`, `measured_tokens` (with `llm_prefix`: the visual tokens the text side reads),
    `derived_tokens`, `token_columns`. The task functions below use nothing else.
    """

    family = "merge_bridge"
    knob = "r"

    def __init__(self, model: Any, processor: Any) -> None:
        self.model, self.processor = model, processor

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str, dtype: str) -> MergeBridgeEvaluator:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).to(device).eval()
        return cls(model, AutoProcessor.from_pretrained(str(model_dir)))

    def image_size(self) -> int:
        """Side of the images the vision tower expects (shapes images are drawn at this size)."""
        size = self.model.config.vision_config.image_size
        return size if isinstance(size, int) else size[0]

    # -- quality

    def generate_report(self, rows: Dataset, task: str, args: EvalArguments) -> dict[str, float]:
        return caption_report(self.model, self.processor, rows, task, args.max_new_tokens, args.batch_size,
                              args.num_beams, args.progress)

    retrieval_method = "likelihood (mean log p(caption | image))"

    def retrieval_scores(self, images: Sequence[PIL.Image.Image], texts: Sequence[str],
                         args: EvalArguments) -> torch.Tensor:
        return caption_log_likelihoods(self.model, self.processor, images, texts, args.batch_size, args.progress)

    def retrieval_extras(self, data: Dataset, args: EvalArguments) -> dict[str, float]:
        return {}

    def check_sweep(self, values: Sequence[int | float]) -> None:
        bad = [v for v in values if not isinstance(v, int)]
        if bad:
            raise ValueError(f"--sweep: MergeBridge sweeps integer merges per layer r, got {bad}")

    # -- the technique

    def settings(self) -> list[tuple[str, Any]]:
        """(label, knob value) for technique off and on: r = 0 and the config's r (None: as configured)."""
        return [("merging off (r=0)", 0), (f"merging on (r={self.knob_value()})", None)]

    def knob_value(self) -> Any:
        """The bridge's r in the current setting."""
        return self.model.bridge.encoder.merging.r

    @contextmanager
    def setting(self, r: Any) -> Iterator[None]:
        """Run the bridge with r merges per layer (None: the config's) and expand `<image>` to match."""
        encoder = self.model.bridge.encoder
        saved = encoder.merging, self.processor.num_image_tokens
        if r is not None:
            encoder.merging = dataclasses.replace(encoder.merging, r=r)
        self.processor.num_image_tokens = self.derived_tokens()["llm_prefix"]
        try:
            yield
        finally:
            encoder.merging, self.processor.num_image_tokens = saved

    def derived_tokens(self) -> dict[str, Any]:
        """Visual tokens at each stage as the configs predict them (for the current setting)."""
        tower, encoder = self.model.vision_tower, self.model.bridge.encoder
        vision_in = tower.num_tokens()
        vision_out = (tower.token_counts() or [vision_in])[-1]
        bridge = encoder.token_counts(vision_out)
        return {"vision_in": vision_in, "vision_out": vision_out, "bridge": bridge,
                "llm_prefix": (bridge or [vision_out])[-1]}

    # -- the calls that speed measures

    def batch(self, images: Sequence[PIL.Image.Image], captions: Sequence[str]) -> dict[str, Any]:
        prompts = [self.processor.build_prompt("caption")] * len(images)
        return {
            "generate": _to_model(self.processor(images=list(images), text=prompts), self.model),
            "forward": _to_model(self.processor(images=list(images), text=prompts, targets=list(captions)),
                                 self.model),
        }

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model.get_image_features(batch["generate"]["pixel_values"])

    def token_columns(self, tokens: dict[str, Any]) -> dict[str, Any]:
        """Visual tokens per stage as speed-table columns."""
        return {"vision tokens in/out": f"{tokens['vision_in']}/{tokens['vision_out']}",
                "bridge tokens": " → ".join(str(n) for n in [tokens["vision_out"], *tokens["bridge"]]),
                "LLM prefix tokens": tokens["llm_prefix"]}

    def measured_tokens(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Visual tokens at each stage as a forward pass produces them."""
        pixels = batch["generate"]["pixel_values"]
        vision = self.model.vision_tower(pixels).last_hidden_state  # (B, N, Cv)
        features, counts = self.model.bridge(vision)  # (B, M, C_llm), tokens after each bridge layer
        prefix = int((batch["generate"]["input_ids"][0] == self.processor.image_token_id).sum())
        if prefix != features.shape[1]:
            raise RuntimeError(f"the prompt holds {prefix} image tokens but the bridge gave {features.shape[1]}")
        return {"vision_in": self.model.vision_tower.num_tokens(int(pixels.shape[-1])), "vision_out": vision.shape[1],
                "bridge": list(counts), "llm_prefix": features.shape[1]}


# ----------------------------------------------------------------------------- PatchAlign


def _pixels(processor: Any, images: Sequence[PIL.Image.Image], model: Any) -> torch.Tensor:
    pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    return pixels.to(model.device, model.dtype)  # (B, 3, H, W)


@torch.no_grad()
def patch_align_retrieval_scores(model: Any, processor: Any, images: Sequence[PIL.Image.Image], texts: Sequence[str],
                                 k: int = 16, batch_size: int = 32, itm: bool = True) -> torch.Tensor:
    """(num_images, num_texts): ITC similarity for every pair; with `itm`, each image's top-k texts (and each
    text's top-k images) are re-ranked by the ITM match probability, placed above every other pair.

    Works on any PatchAlign head with `patch_align` and `itm_head` (pretraining or retrieval). Images are
    encoded once (text-agnostic tokens), texts once; ITM runs on the candidate pairs in batches.
    """
    pa = model.patch_align
    image_tokens = torch.cat([pa.encode_image(_pixels(processor, images[s:s + batch_size], model)).agnostic
                              for s in range(0, len(images), batch_size)])  # (I, N', Cv)
    tokens = processor.tokenizer(list(texts), padding=True, truncation=True, max_length=processor.max_length,
                                 return_tensors="pt").to(model.device)
    text = torch.cat([pa.encode_text(tokens["input_ids"][s:s + batch_size], tokens["attention_mask"][s:s + batch_size])
                      for s in range(0, len(texts), batch_size)])  # (T, L, Ct)
    itc = (pa.image_feature(image_tokens) @ pa.text_feature(text).t()).float()  # (I, T)
    if not itm:
        return itc.cpu()
    pairs = set()
    for i, row in enumerate(itc.topk(min(k, itc.shape[1]), dim=1).indices.tolist()):
        pairs.update((i, j) for j in row)
    for j, col in enumerate(itc.t().topk(min(k, itc.shape[0]), dim=1).indices.tolist()):
        pairs.update((i, j) for i in col)
    pairs_t = torch.tensor(sorted(pairs), device=itc.device)  # (n, 2) of (image, text)
    probs = []
    mask = tokens["attention_mask"]
    for s in range(0, len(pairs_t), batch_size):
        i, j = pairs_t[s:s + batch_size].unbind(1)
        fused = pa.fuse(text[j], mask[j], image_tokens[i])
        probs.append(model.itm_head(fused[:, 0]).float().softmax(-1)[:, 1])
    scores = itc.clone()
    scores[pairs_t[:, 0], pairs_t[:, 1]] = 10.0 + torch.cat(probs)  # ITC lies in [-1, 1]: candidates rank first
    return scores.cpu()


def _r_precision(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per sample with positives: share of positives among the top-|positives| scored patches."""
    out = []
    for s, y in zip(scores, labels):
        n = int(y.sum())
        if n:
            out.append(float(y[s.topk(n).indices].mean()))
    return out


@torch.no_grad()
def detector_precision(model: Any, processor: Any, data: Dataset, batch_size: int = 32) -> float | None:
    """R-precision of the text-aware patch detector against the PTA labels, on each image's first caption.

    PTA labels mark the patches of boxes the caption mentions; the score is the share of those among the
    detector's top-|labels| patches, averaged over images with at least one such patch. None without a detector
    or boxes.
    """
    pa = model.patch_align
    columns = set(data.column_names or [])
    if not model.config.patch_detector["enabled"] or not {"boxes", "box_labels", "captions"} <= columns:
        return None
    data = data.cast_column("image", ImageFeature(decode=False))
    values: list[float] = []
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        rows = [r for r in rows if r["boxes"] and r["captions"]]
        if not rows:
            continue
        images = [decode_image(r["image"], r["image_id"]) for r in rows]
        batch = processor(images=images, text=[r["captions"][0] for r in rows], boxes=[r["boxes"] for r in rows],
                          box_labels=[r["box_labels"] for r in rows]).to(model.device)
        text = pa.encode_text(batch["input_ids"], batch["attention_mask"])
        enc = pa.encode_image(batch["pixel_values"].to(model.dtype), text_cls=text[:, 0])
        values += _r_precision(enc.logits.float().cpu(), batch["patch_labels"].cpu())
    return sum(values) / len(values) if values else None


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
        pixels = _pixels(processor, images, model)
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
    report: dict[str, Any] = {"token_accuracy": correct / max(total, 1)}
    if task == "vqa":
        report["vqa_accuracy"] = vqa_accuracy(predictions, references)
    else:
        report.update(caption_metrics(predictions, references))
    report["example"] = predictions[0] if predictions else ""
    report["images"] = len(predictions)
    return report


def patch_align_report(model: Any, processor: Any, data: Dataset | None, task: str, num_images: int,
                       max_new_tokens: int = 20) -> dict[str, Any] | None:
    """train.py's before/after numbers on held-out images: retrieval R@k (ITC + ITM re-ranking) and the
    detector's R-precision after pretrain / retrieval, generation quality after caption / vqa."""
    if data is None or len(data) == 0:
        return None
    data = data.select(range(min(num_images, len(data))))
    if task in ("caption", "vqa"):
        return patch_align_generation_report(model, processor, task_rows(data, task), task, max_new_tokens)
    was_training = model.training
    model.eval()
    images, texts, owner = images_and_captions(data)
    report: dict[str, Any] = dict(retrieval_recall(patch_align_retrieval_scores(model, processor, images, texts), owner))
    precision = detector_precision(model, processor, data)
    if precision is not None:
        report["pta_precision"] = precision
    model.train(was_training)
    report["images"] = len(images)
    return report


class PatchAlignEvaluator(_SpeedCalls):
    """PatchAlign: captions and answers from its decoder, ITC + ITM retrieval, the patch detector's keep ratio.

    The technique knob is the detector's keep ratio: pruning changes no parameters, and keep ratio 1.0 runs every
    patch through every block (exactly the unpruned model), so "detector off" is the same weights at 1.0.
    Heads load lazily from the same folder: the decoder for generation and speed, the ITM head for retrieval
    (a folder without one, e.g. caption-trained, ranks by ITC alone and says so).
    """

    family = "patch_align"
    knob = "keep_ratio"

    def __init__(self, model_dir: str | Path, device: str, dtype: str) -> None:
        from safetensors import safe_open

        self.model_dir, self.device, self.dtype = str(model_dir), device, DTYPES[dtype]
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
            self.has_itm = "itm_head.weight" in set(f.keys())
        self._models: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str, dtype: str) -> PatchAlignEvaluator:
        if not (Path(model_dir) / "model.safetensors").is_file():
            raise FileNotFoundError(f"model_dir {str(model_dir)!r} has no model.safetensors")
        return cls(model_dir, device, dtype)

    def _load(self, kind: str) -> Any:
        from . import PatchAlignForConditionalGeneration, PatchAlignForImageTextRetrieval, PatchAlignForQuestionAnswering

        if kind not in self._models:
            cls = {"caption": PatchAlignForConditionalGeneration, "vqa": PatchAlignForQuestionAnswering,
                   "retrieval": PatchAlignForImageTextRetrieval}[kind]
            self._models[kind] = cls.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        return self._models[kind]

    @property
    def model(self) -> Any:
        """The caption model (the one speed measures)."""
        return self._load("caption")

    def image_size(self) -> int:
        size = self.model.config.vision_config.image_size
        return size if isinstance(size, int) else size[0]

    # -- quality

    def generate_report(self, rows: Dataset, task: str, args: EvalArguments) -> dict[str, Any]:
        return patch_align_generation_report(self._load(task), self.processor, rows, task, args.max_new_tokens,
                                             args.batch_size, args.num_beams, args.progress)

    @property
    def retrieval_method(self) -> str:
        if self.has_itm:
            return "ITC similarity for all pairs, ITM re-ranking of each row's top-16"
        return "ITC similarity for all pairs (the checkpoint has no ITM head)"

    def retrieval_scores(self, images: Sequence[PIL.Image.Image], texts: Sequence[str],
                         args: EvalArguments) -> torch.Tensor:
        return patch_align_retrieval_scores(self._load("retrieval"), self.processor, images, texts, 16,
                                            args.batch_size, itm=self.has_itm)

    def retrieval_extras(self, data: Dataset, args: EvalArguments) -> dict[str, float]:
        precision = detector_precision(self._load("retrieval"), self.processor, data, args.batch_size)
        return {} if precision is None else {"pta_precision": precision}

    # -- the technique

    def check_sweep(self, values: Sequence[float]) -> None:
        bad = [v for v in values if not 0.0 < v <= 1.0]
        if bad:
            raise ValueError(f"--sweep: PatchAlign sweeps keep ratios in (0, 1], got {bad}")

    def settings(self) -> list[tuple[str, Any]]:
        if not self.model.config.patch_detector["enabled"]:
            raise ValueError(f"{self.model_dir}: the patch detector is disabled in this model's config; speed "
                             "compares it on and off")
        return [("detector off (keep_ratio=1.0)", 1.0), (f"detector on (keep_ratio={self.knob_value()})", None)]

    def knob_value(self) -> float:
        return self.model.config.patch_detector["keep_ratio"]

    @contextmanager
    def setting(self, keep_ratio: float | None) -> Iterator[None]:
        """Run every loaded head with the detector keeping `keep_ratio` (None: the config's)."""
        configs = [m.config for m in self._models.values()] or [self.model.config]
        saved = [c.patch_detector["keep_ratio"] for c in configs]
        if keep_ratio is not None:
            for c in configs:
                c.patch_detector["keep_ratio"] = float(keep_ratio)
        try:
            yield
        finally:
            for c, value in zip(configs, saved):
                c.patch_detector["keep_ratio"] = value

    def derived_tokens(self) -> dict[str, Any]:
        config = self.model.config
        vision_in = 1 + config.num_patches
        kept = config.num_kept_patches
        out = 1 + kept + (1 if kept < config.num_patches else 0)  # CLS + kept + the fused token
        return {"vision_in": vision_in, "after_detector": out, "llm_prefix": out}

    # -- the calls that speed measures

    def batch(self, images: Sequence[PIL.Image.Image], captions: Sequence[str]) -> dict[str, Any]:
        pixels = _pixels(self.processor, images, self.model)
        text = self.processor.tokenizer(list(captions), padding=True, truncation=True,
                                        max_length=self.processor.max_length, return_tensors="pt").to(self.device)
        labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
        return {"generate": {"pixel_values": pixels},
                "forward": {"pixel_values": pixels, **text, "labels": labels}}

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model.patch_align.encode_image(batch["generate"]["pixel_values"]).agnostic

    def token_columns(self, tokens: dict[str, Any]) -> dict[str, Any]:
        return {"vision tokens in/out": f"{tokens['vision_in']}/{tokens['after_detector']}",
                "decoder memory tokens": tokens["llm_prefix"]}

    def measured_tokens(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tokens as the tower produces them: its input, and what leaves it (the decoder's memory)."""
        pixels = batch["generate"]["pixel_values"]
        out = self.encode(batch).shape[1]
        return {"vision_in": self.model.patch_align.vision_tower.num_tokens(int(pixels.shape[-1])),
                "after_detector": out, "llm_prefix": out}


# ----------------------------------------------------------------------------- family dispatch

# model_type -> evaluator class; a family missing here makes check_family raise NotImplementedError.
EVALUATORS: dict[str, type] = {"merge_bridge": MergeBridgeEvaluator, "patch_align": PatchAlignEvaluator}


def check_family(model_dir: str | Path, task: str) -> str:
    """The folder's model family (config.json model_type), if eval supports `task` for it."""
    family = read_config(model_dir).get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json in {str(model_dir)!r}: model_type {family!r} is not a leanvlp model family "
                         f"({sorted(FAMILIES)})")
    if family not in EVALUATORS:
        raise NotImplementedError(f"leanvlp-eval: task {task!r} is not implemented for model family {family!r} yet "
                                  f"(implemented: {sorted(EVALUATORS)})")
    return family


def load_evaluator(model_dir: str | Path, task: str, device: str = "cpu", dtype: str = "fp32") -> Any:
    """The saved model and processor on `device`, wrapped in their family's evaluator."""
    return EVALUATORS[check_family(model_dir, task)].from_pretrained(model_dir, device, dtype)


# ----------------------------------------------------------------------------- tasks


def run_generation_task(ev: Any, data: Dataset, args: EvalArguments) -> dict[str, Any]:
    report = ev.generate_report(task_rows(data, args.task), args.task, args)
    metrics = {k: v for k, v in report.items() if isinstance(v, float)}
    noun = "questions" if args.task == "vqa" else "images"
    return {"metrics": metrics, f"num_{noun}": report["images"], "example": report["example"]}


def run_retrieval(ev: Any, data: Dataset, args: EvalArguments) -> dict[str, Any]:
    images, texts, owner = images_and_captions(data)
    scores = ev.retrieval_scores(images, texts, args)  # (I, T)
    metrics = {**retrieval_recall(scores, owner), **ev.retrieval_extras(data, args)}
    return {"metrics": metrics, "method": ev.retrieval_method, "num_images": len(images), "num_texts": len(texts)}


def measure_setting(ev: Any, batch: dict[str, Any], num_images: int, args: EvalArguments,
                    memory: bool = True) -> dict[str, Any]:
    """Visual tokens, FLOPs per image (and peak memory of generation) in the evaluator's current setting."""
    with torch.no_grad():
        out = {"tokens": ev.measured_tokens(batch),
               "encode_flops": count_flops(lambda: ev.encode(batch)) // num_images,
               "forward_flops": count_flops(lambda: ev.forward(batch)) // num_images}
        if memory:
            out["peak_memory_bytes"] = peak_memory(lambda: ev.generate(batch, args.max_new_tokens, args.num_beams),
                                                   torch.device(args.device))
    return out


def time_settings(ev: Any, setups: Sequence[tuple[Any, dict[str, Any]]], num_images: int, args: EvalArguments,
                  kinds: Sequence[str] = ("encode", "generate")) -> list[dict[str, float]]:
    """Images/s of `encode` and `generate` for each (knob value, batch), all settings timed in turns."""

    def call(value: Any, batch: dict[str, Any], kind: str) -> Callable[[], Any]:
        def run() -> Any:
            with ev.setting(value):
                if kind == "encode":
                    return ev.encode(batch)
                return ev.generate(batch, args.max_new_tokens, args.num_beams)
        return run

    out: list[dict[str, float]] = [{} for _ in setups]
    with torch.no_grad():
        for kind in kinds:
            rates = images_per_second([call(v, b, kind) for v, b in setups], num_images, torch.device(args.device),
                                      args.warmup, args.repeats)
            for result, rate in zip(out, rates):
                result[f"{kind}_images_per_s"] = rate
    return out


def _speed_row(ev: Any, label: str, m: dict[str, Any]) -> dict[str, Any]:
    """One row of the speed table (the card shows these)."""
    row = {"setting": label, **ev.token_columns(m["tokens"]),
           "encode GFLOPs/img": m["encode_flops"] / 1e9, "caption fwd GFLOPs/img": m["forward_flops"] / 1e9}
    if "encode_images_per_s" in m:
        row["encode img/s"] = m["encode_images_per_s"]
    row["generate img/s"] = m["generate_images_per_s"]
    if "peak_memory_bytes" in m:
        row["peak MiB (generate)"] = m["peak_memory_bytes"] / MIB
    return row


def _speed_inputs(data: Dataset, args: EvalArguments) -> tuple[list[PIL.Image.Image], list[str]]:
    """The timed batch: the first `batch_size` images with their first captions."""
    rows = task_rows(data, "caption")
    rows = rows.select(range(min(args.batch_size, len(rows))))
    return [decode_image(r["image"], r["image_id"]) for r in rows], list(rows["target"])


def run_speed(ev: Any, data: Dataset, args: EvalArguments) -> dict[str, Any]:
    images, captions = _speed_inputs(data, args)
    settings, setups = [], []
    for label, value in ev.settings():
        with ev.setting(value):
            batch = ev.batch(images, captions)
            measured = measure_setting(ev, batch, len(images), args)
            settings.append({"setting": label, ev.knob: ev.knob_value(), **measured,
                             "derived_tokens": ev.derived_tokens()})
            setups.append((value, batch))
    for setting, rates in zip(settings, time_settings(ev, setups, len(images), args)):
        setting.update(rates)
    off, on = settings
    metrics = {
        "speedup_generate": on["generate_images_per_s"] / off["generate_images_per_s"],
        "speedup_encode": on["encode_images_per_s"] / off["encode_images_per_s"],
        "flops_reduction_encode": off["encode_flops"] / on["encode_flops"],
        "flops_reduction_forward": off["forward_flops"] / on["forward_flops"],
        "llm_prefix_tokens_off": off["tokens"]["llm_prefix"],
        "llm_prefix_tokens_on": on["tokens"]["llm_prefix"],
    }
    return {"metrics": metrics, "rows": [_speed_row(ev, s["setting"], s) for s in settings], "settings": settings,
            "batch_images": len(images), "memory_measure": memory_measure(torch.device(args.device)),
            "device": args.device, "dtype": args.dtype}


def run_sweep(ev: Any, data: Dataset, args: EvalArguments, plot_path: Path) -> dict[str, Any]:
    """Speed and caption CIDEr-D for every knob value in `--sweep`, and the speed-vs-quality PNG."""
    images, captions = _speed_inputs(data, args)
    rows = task_rows(data, "caption")
    points, setups = [], []
    for value in tqdm(args.sweep_values, desc=f"sweep {ev.knob}", disable=not args.progress):
        with ev.setting(value):
            batch = ev.batch(images, captions)
            measured = measure_setting(ev, batch, len(images), args, memory=False)
            quality = ev.generate_report(rows, "caption", dataclasses.replace(args, progress=False))
        points.append({ev.knob: value, **measured, "cider": quality["cider"]})
        setups.append((value, batch))
    for point, rates in zip(points, time_settings(ev, setups, len(images), args, kinds=("generate",))):
        point.update(rates)
    save_speed_quality_plot(points, ev.knob, plot_path)
    table = [{**_speed_row(ev, f"sweep {ev.knob}={p[ev.knob]}", p), "CIDEr-D": p["cider"]} for p in points]
    return {"kind": "sweep", "metrics": {}, "rows": table, "sweep": points, "plot": plot_path.name}


def save_speed_quality_plot(points: list[dict[str, Any]], knob: str, path: Path) -> Path:
    """CIDEr-D against generation throughput and against FLOPs per caption forward, one labelled point per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    cider = [p["cider"] for p in points]
    for ax, key, label in ((axes[0], "generate_images_per_s", "captions / s (generate)"),
                           (axes[1], "forward_flops", "GFLOPs per image (caption forward)")):
        xs = [p[key] / (1e9 if key.endswith("flops") else 1) for p in points]
        ax.plot(xs, cider, "o-")
        for x, y, p in zip(xs, cider, points):
            ax.annotate(f"{knob}={p[knob]}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("CIDEr-D")
        ax.grid(alpha=0.3)
    fig.suptitle("speed vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- results, card, CLI


def update_eval_results(model_dir: str | Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Replace the entry with the same task, dataset, split (and kind) in eval_results.json; keep the others."""
    path = Path(model_dir) / "eval_results.json"
    entries = parse_eval_results(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else []

    def key(e: dict[str, Any]) -> tuple:
        return e["task"], e["dataset"], e.get("split"), e.get("kind")

    entries = [e for e in entries if key(e) != key(entry)] + [entry]
    parse_eval_results({"results": entries})  # never write a file the card cannot read
    path.write_text(json.dumps({"results": entries}, indent=2, ensure_ascii=False), encoding="utf-8")
    return entries


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts as an aligned plain-text table."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [columns] + [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def run_evaluation(args: EvalArguments) -> list[dict[str, Any]]:
    """Evaluate, write eval_results.json and README.md into the model folder; returns the new entries."""
    sweep = args.sweep_values  # bad --sweep fails before any work
    model_dir = Path(args.model)
    ev = load_evaluator(model_dir, args.task, args.device, args.dtype)
    if sweep:
        ev.check_sweep(sweep)
    data = load_eval_data(args, ev.image_size())
    base = {"task": args.task, "dataset": dataset_id(args), "split": args.split}
    if args.task in ("caption", "vqa"):
        results = [{**base, **run_generation_task(ev, data, args)}]
    elif args.task == "retrieval":
        results = [{**base, **run_retrieval(ev, data, args)}]
    else:
        results = [{**base, **run_speed(ev, data, args)}]
        if sweep:
            results.append({**base, **run_sweep(ev, data, args, model_dir / "speed_quality.png")})
    for entry in results:
        update_eval_results(model_dir, entry)
    card = write_model_card(model_dir, **card_kwargs_from_folder(model_dir))
    for entry in results:
        print_entry(entry)
    print(f"results: {model_dir / 'eval_results.json'}   card: {card}")
    return results


def print_entry(entry: dict[str, Any]) -> None:
    title = f"{entry['task']}{' sweep' if entry.get('kind') else ''} on {entry['dataset']} ({entry['split']})"
    print("\n" + title + "\n" + "=" * len(title))
    if "method" in entry:
        print(f"retrieval score: {entry['method']}; {entry['num_images']} images x {entry['num_texts']} captions")
    if entry.get("metrics"):
        print(format_table([{"metric": k, "value": v} for k, v in entry["metrics"].items()]))
    if entry.get("rows"):
        print(format_table(entry["rows"]))
    if "memory_measure" in entry:
        print(f"peak memory: {entry['memory_measure']}")
    if "example" in entry:
        print(f"example: {entry['example']!r}")


def parse_args(argv: Sequence[str] | None = None) -> EvalArguments:
    parser = HfArgumentParser(EvalArguments, prog="leanvlp-eval",
                              description="Evaluate a saved leanvlp model; results go into its folder and card.")
    (args,) = parser.parse_args_into_dataclasses(list(sys.argv[1:] if argv is None else argv))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """`eval.py` / `leanvlp-eval`: 0 on success, 2 with a one-line error on bad input."""
    try:
        run_evaluation(parse_args(argv))
    except (OSError, ValueError, TypeError, NotImplementedError) as err:
        print(f"leanvlp-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "EVALUATORS",
    "EvalArguments",
    "LiveTensorBytes",
    "MergeBridgeEvaluator",
    "PatchAlignEvaluator",
    "caption_log_likelihoods",
    "detector_precision",
    "patch_align_generation_report",
    "patch_align_report",
    "patch_align_retrieval_scores",
    "caption_report",
    "count_flops",
    "eval_rows",
    "load_eval_data",
    "load_evaluator",
    "main",
    "peak_memory",
    "run_evaluation",
    "update_eval_results",
]


if __name__ == "__main__":
    raise SystemExit(main())
