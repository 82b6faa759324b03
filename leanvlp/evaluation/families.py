"""One evaluator per model family behind one interface, the dispatch from a folder's model_type, and train.py's
PatchAlign before/after report. The task modules call only what the evaluators provide."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from datasets import Dataset

from ..data.pairs import images_and_captions, task_rows
from ..metrics import retrieval_recall
from ..model_card import FAMILIES, read_config
from .arguments import DTYPES, EvalArguments
from .generation import caption_report, patch_align_generation_report
from .inputs import pixels_on_model, to_model
from .retrieval import caption_log_likelihoods, detector_precision, patch_align_retrieval_scores


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
    `derived_tokens`, `token_columns`. The task modules (generation, retrieval, speed) use nothing else.
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
        encoder, config = self.model.bridge.encoder, self.model.config
        saved = encoder.merging, config.bridge_merging, self.processor.num_image_tokens
        if r is not None:  # the module and the config together: the model checks its inputs against the config
            encoder.merging = dataclasses.replace(encoder.merging, r=r)
            config.bridge_merging = encoder.merging.to_dict()
        self.processor.num_image_tokens = self.derived_tokens()["llm_prefix"]
        try:
            yield
        finally:
            encoder.merging, config.bridge_merging, self.processor.num_image_tokens = saved

    def derived_tokens(self) -> dict[str, Any]:
        """Visual tokens at each stage as the configs predict them (for the current setting)."""
        tower, encoder, config = self.model.vision_tower, self.model.bridge.encoder, self.model.config
        vision_in = tower.num_tokens()
        vision_out = (tower.token_counts() or [vision_in])[-1]
        bridge_in = config.num_bridge_input_tokens  # the feature layer's tokens, after the patch detector if on
        bridge = encoder.token_counts(bridge_in)
        return {"vision_in": vision_in, "vision_out": vision_out, "bridge_in": bridge_in, "bridge": bridge,
                "llm_prefix": (bridge or [bridge_in])[-1]}

    # -- the calls that speed measures

    def batch(self, images: Sequence[PIL.Image.Image], captions: Sequence[str]) -> dict[str, Any]:
        prompts = [self.processor.build_prompt("caption")] * len(images)
        return {
            "generate": to_model(self.processor(images=list(images), text=prompts), self.model),
            "forward": to_model(self.processor(images=list(images), text=prompts, targets=list(captions)),
                                 self.model),
        }

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model.get_image_features(batch["generate"]["pixel_values"]).pooler_output  # (B, M, C_llm)

    def token_columns(self, tokens: dict[str, Any]) -> dict[str, Any]:
        """Visual tokens per stage as speed-table columns."""
        return {"vision tokens in/out": f"{tokens['vision_in']}/{tokens['vision_out']}",
                "bridge tokens": " → ".join(str(n) for n in [tokens["bridge_in"], *tokens["bridge"]]),
                "LLM prefix tokens": tokens["llm_prefix"]}

    def measured_tokens(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Visual tokens at each stage as a forward pass produces them."""
        pixels = batch["generate"]["pixel_values"]
        image = self.model.get_image_features(pixels)
        vision, features = image.last_hidden_state, image.pooler_output  # (B, N, Cv), (B, M, C_llm)
        counts = image.bridge_token_counts  # tokens after each bridge layer
        prefix = int((batch["generate"]["input_ids"][0] == self.processor.image_token_id).sum())
        if prefix != features.shape[1]:
            raise RuntimeError(f"the prompt holds {prefix} image tokens but the bridge gave {features.shape[1]}")
        bridge_in = vision.shape[1]
        if image.kept_patches is not None:  # the patch detector: the bridge reads CLS + K kept + the fused token
            patches, kept = image.patch_logits.shape[1], image.kept_patches.shape[1]
            bridge_in = vision.shape[1] - patches + kept + int(kept < patches)
        return {"vision_in": self.model.vision_tower.num_tokens(int(pixels.shape[-1])), "vision_out": vision.shape[1],
                "bridge_in": bridge_in, "bridge": list(counts), "llm_prefix": features.shape[1]}


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
        from .. import PatchAlignForConditionalGeneration, PatchAlignForImageTextRetrieval, PatchAlignForQuestionAnswering

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
        out = config.num_image_tokens  # CLS + kept + the fused token, after any merging in the tower
        return {"vision_in": 1 + config.num_patches, "after_detector": out, "llm_prefix": out}

    # -- the calls that speed measures

    def batch(self, images: Sequence[PIL.Image.Image], captions: Sequence[str]) -> dict[str, Any]:
        pixels = pixels_on_model(self.processor, images, self.model)
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
