"""MergeBridgeProcessor: image processor + LLM tokenizer, expanding `<image>` into the model's visual tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

IGNORE_INDEX = -100
PROMPT_TEMPLATES = {"caption": "", "vqa": "Question: {question} Short answer:"}


class MergeBridgeProcessor(ProcessorMixin):
    r"""
    Builds MergeBridge inputs. One `<image>` placeholder in a prompt becomes exactly `num_image_tokens` image
    tokens (the bridge's merged token count is deterministic, so it is known before the forward pass); the
    model scatters the visual prefix into those positions.

    With `targets` (captions or answers) the processor appends target + EOS and builds `labels` that are -100
    on image, prompt and padding positions (loss on the target only), padding on the right. Without targets it
    pads on the left, ready for `generate()`.

    Args:
        image_processor: The vision tower's image processor (a PIL-backed one; torchvision is not needed).
        tokenizer: The LLM tokenizer; it must know `image_token` (see `from_vision_text_pretrained`).
        num_image_tokens (`int`): Visual tokens per image, `MergeBridgeConfig.num_image_tokens`.
        image_token (`str`, defaults to `"<image>"`): The placeholder.
        max_length (`int`, *optional*): The LLM context; longer inputs are an error, not a silent truncation.
        prompt_templates (`dict`, *optional*): Prompt per task; defaults to captioning `""` and VQA
            `"Question: {question} Short answer:"` (EVLGen's).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int = 1,
        image_token: str = "<image>",
        max_length: int | None = None,
        prompt_templates: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"MergeBridgeProcessor: num_image_tokens must be a positive int, got {num_image_tokens!r}")
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.max_length = max_length
        self.prompt_templates = dict(prompt_templates or PROMPT_TEMPLATES)
        super().__init__(image_processor, tokenizer, **kwargs)
        if image_token not in self.tokenizer.get_vocab():
            raise ValueError(
                f"MergeBridgeProcessor: the tokenizer has no token {image_token!r}; build the processor with "
                "MergeBridgeProcessor.from_vision_text_pretrained(...), which adds it"
            )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)

    @classmethod
    def from_vision_text_pretrained(
        cls, vision: str, text: str, *, num_image_tokens: int | None = None, config: Any = None, **kwargs: Any
    ) -> "MergeBridgeProcessor":
        """Processor from a vision checkpoint's image processor and a causal LM's tokenizer.

        Adds `<image>` (and a pad token if the LLM has none) to the tokenizer. Give either the model's
        `config` (a MergeBridgeConfig; its `num_image_tokens` is used) or `num_image_tokens` directly.
        """
        image_processor = AutoImageProcessor.from_pretrained(vision, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(text)
        image_token = kwargs.pop("image_token", getattr(config, "image_token", "<image>"))
        add_special_tokens(tokenizer, image_token)
        if config is not None:
            num_image_tokens = config.num_image_tokens
        if num_image_tokens is None:
            raise ValueError("MergeBridgeProcessor.from_vision_text_pretrained needs config= or num_image_tokens=")
        max_length = kwargs.pop("max_length", getattr(getattr(config, "text_config", None), "max_position_embeddings", None))
        return cls(image_processor, tokenizer, num_image_tokens=num_image_tokens, image_token=image_token,
                   max_length=max_length, **kwargs)

    def build_prompt(self, task: str = "caption", **fields: str) -> str:
        """`<image>` followed by the task's template, e.g. `build_prompt("vqa", question="what colour?")`."""
        if task not in self.prompt_templates:
            raise ValueError(f"MergeBridgeProcessor: unknown task {task!r}; known: {sorted(self.prompt_templates)}")
        return self.image_token + self.prompt_templates[task].format(**fields)

    def _pixel_values(self, images: Any, videos: Any) -> torch.Tensor:
        if videos is not None:
            if images is not None:
                raise ValueError("MergeBridgeProcessor: pass images= or videos=, not both")
            for i, clip in enumerate(videos):
                if len(clip) == 0:
                    raise ValueError(f"MergeBridgeProcessor: video {i} has zero frames")
            lengths = {len(clip) for clip in videos}
            if len(lengths) != 1:
                raise ValueError(f"MergeBridgeProcessor: videos in a batch need equal frame counts, got {sorted(lengths)}")
            frames = [frame for clip in videos for frame in clip]
            pixels = self.image_processor(frames, return_tensors="pt")["pixel_values"]  # (B*T, C, H, W)
            return pixels.view(len(videos), lengths.pop(), *pixels.shape[1:])  # (B, T, C, H, W)
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple)):
            images = [image for sample in images for image in sample]  # one image per prompt placeholder
        return self.image_processor(images, return_tensors="pt")["pixel_values"]  # (B, C, H, W)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: Sequence[Sequence[Any]] | None = None,
        targets: str | Sequence[str] | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenise prompts (with `<image>` expanded), process images or videos, and build labels for targets.

        Prompts without any `<image>` get one prepended when images/videos are given (PaliGemma-style).
        A batch is always padded to its longest sequence (`padding` is accepted for pipeline compatibility).
        """
        if kwargs:
            raise TypeError(f"MergeBridgeProcessor got unexpected arguments: {sorted(kwargs)}")
        if images is None and videos is None and text is None:
            raise ValueError("MergeBridgeProcessor: give images=, videos= or text=")
        num_visual = 0 if images is None and videos is None else (len(videos) if videos is not None else _count(images))
        if text is None:
            text = [self.prompt_templates["caption"]] * num_visual
        prompts = [text] if isinstance(text, str) else list(text)
        if targets is not None:
            targets = [targets] if isinstance(targets, str) else list(targets)
            if len(targets) != len(prompts):
                raise ValueError(f"MergeBridgeProcessor: {len(targets)} targets for {len(prompts)} prompts")
        placeholders = sum(p.count(self.image_token) for p in prompts)
        if num_visual and placeholders == 0:
            prompts = [self.image_token + p for p in prompts]
            placeholders = len(prompts)
        if placeholders != num_visual:
            raise ValueError(
                f"MergeBridgeProcessor: {num_visual} images/videos but {placeholders} {self.image_token!r} "
                "placeholders in text; give one image per placeholder"
            )
        expanded = [p.replace(self.image_token, self.image_token * self.num_image_tokens) for p in prompts]
        tok = self.tokenizer
        sequences, label_rows = [], []
        for i, prompt in enumerate(expanded):
            ids = _bos(tok) + tok(prompt, add_special_tokens=False)["input_ids"]
            labels = [IGNORE_INDEX] * len(ids)
            if targets is not None:
                target_ids = tok(" " + targets[i].strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids, labels = ids + target_ids, labels + target_ids
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(
                    f"MergeBridgeProcessor: sample {i} is {len(ids)} tokens (with {self.num_image_tokens} image "
                    f"tokens per image), longer than the LLM context max_length={self.max_length}"
                )
            sequences.append(ids)
            label_rows.append(labels)
        left = targets is None  # left padding for generation, right padding for training
        width = max(len(s) for s in sequences)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
        labels = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
        for i, (ids, lab) in enumerate(zip(sequences, label_rows)):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[i, span], attention_mask[i, span], labels[i, span] = ids, 1, lab
        data: dict[str, Any] = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
        if targets is not None:
            data["labels"] = torch.from_numpy(labels)
        if num_visual:
            data["pixel_values"] = self._pixel_values(images, videos)
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def add_special_tokens(tokenizer: Any, image_token: str) -> None:
    """Add the image placeholder (and a pad token, if missing) to an LLM tokenizer, in place."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _count(images: Any) -> int:
    if isinstance(images, (list, tuple)):
        return sum(len(x) if isinstance(x, (list, tuple)) else 1 for x in images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return images.shape[0]
    return 1


__all__ = ["MergeBridgeProcessor", "add_special_tokens", "IGNORE_INDEX", "PROMPT_TEMPLATES"]
