"""MergeBridgeProcessor: image processor + LLM tokenizer, expanding `<image>` into the model's visual tokens."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.processing_utils import MultiModalData, ProcessingKwargs, TextKwargs, Unpack

from .inputs import check_kwargs, check_texts, prepare_images, tokenizer_limit
from .processing_patch_align import _GEOMETRY_KWARGS, PatchAlignProcessor

IGNORE_INDEX = -100
PROMPT_TEMPLATES = {"caption": "", "vqa": "Question: {question} Short answer:"}
# text kwargs the processor honours itself (it tokenises sample by sample to place labels and image tokens)
_TEXT_KWARGS = {"padding", "max_length", "pad_to_multiple_of", "padding_side", "return_attention_mask",
                "return_tensors", "add_special_tokens", "truncation", "verbose"}


class MergeBridgeProcessorKwargs(ProcessingKwargs, total=False):
    # return_tensors per modality, not in `common_kwargs`: 5.18 updates a `_defaults["common_kwargs"]` dict in place
    _defaults = {"text_kwargs": {"padding": True, "return_tensors": "pt"}, "images_kwargs": {"return_tensors": "pt"}}


def default_chat_template(image_token: str, prompt_templates: dict[str, str]) -> str:
    """A Jinja chat template that renders a user turn exactly as `build_prompt` does: one `image_token` per image
    (or video) part, then the VQA template around the turn's text, or the caption template when it has none;
    an assistant turn is its text (space-prefixed, EOS-terminated) as the processor appends targets."""
    pre, _, post = prompt_templates["vqa"].partition("{question}")

    def lit(value: str) -> str:
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid Jinja string literal

    return (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
        "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
        "{%- set words = parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- for part in parts if part['type'] in ('image', 'video') -%}{{ " + lit(image_token) + " }}{%- endfor -%}"
        "{%- if words | trim -%}{{ " + lit(pre) + " ~ words ~ " + lit(post) + " }}"
        "{%- else -%}{{ " + lit(prompt_templates["caption"]) + " }}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ' ~ (words | trim) ~ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


class MergeBridgeProcessor(ProcessorMixin):
    r"""
    Builds MergeBridge inputs. One `<image>` placeholder in a prompt becomes exactly `num_image_tokens` image
    tokens (the bridge's merged token count is deterministic, so it is known before the forward pass); the
    model scatters the visual prefix into those positions.

    With `targets` (captions or answers) the processor appends target + EOS and builds `labels` that are -100
    on image, prompt and padding positions (loss on the target only), padding on the right. Without targets it
    pads on the left, ready for `generate()`.

    Keyword arguments follow transformers' `ProcessingKwargs`: flat (`padding=`, `max_length=`, `do_rescale=` ...),
    per modality (`text_kwargs=`, `images_kwargs=`, `videos_kwargs=`) or `common_kwargs=`, with precedence
    call > modality dict > common > tokenizer init > class defaults. The padding side is the exception: it follows
    the task (left for generation, right with targets) unless a call asks otherwise, never the tokenizer's own
    `padding_side` (a right-padding LLM tokenizer would break batched generation). `max_length` bounds a call's
    sequences (and is the length `padding="max_length"` pads to); it cannot exceed the processor's `max_length`,
    the LLM context. Sequences are never truncated: that would cut image tokens or targets.

    Args:
        image_processor: The vision tower's image processor (a PIL-backed one; torchvision is not needed).
        tokenizer: The LLM tokenizer; it must know `image_token` (see `from_vision_text_pretrained`).
        num_image_tokens (`int`): Visual tokens per image, `MergeBridgeConfig.num_image_tokens`.
        image_token (`str`, defaults to `"<image>"`): The placeholder.
        max_length (`int`, *optional*): The LLM context; longer inputs are an error, not a silent truncation.
            Defaults to the tokenizer's `model_max_length` when that is a real size.
        prompt_templates (`dict`, *optional*): Prompt per task; defaults to captioning `""` and VQA
            `"Question: {question} Short answer:"` (EVLGen's).
        chat_template (`str`, *optional*): Defaults to `default_chat_template(image_token, prompt_templates)`, so
            `apply_chat_template` gives `build_prompt`'s prompts; saved as `chat_template.jinja`.
        patch_size (`int`, *optional*): The tower's patch size; needed only for `boxes=` (set by
            `from_vision_text_pretrained(config=...)`).
        object_classes / attributes (`list[str]`, *optional*), synonyms (`dict`, *optional*): the box vocabularies
            of the semantic-head targets and extra words that make a box text-relevant, as `PatchAlignProcessor`'s.

    Boxes (optional): `boxes=` (per image, COCO xywh in stored pixels) with `box_labels=` (and `box_attributes=` /
    `box_features=` for the semantic heads) adds the patch-level targets `PatchAlignProcessor` builds from them
    (`patch_labels`, `pta_mask`, and `class_labels`... when the vocabularies are set), for the patch detector's PTA
    loss and the semantic heads. A box is text-relevant when its category is a word of its image's prompt text
    (the question; a captioning prompt has none, and the model's PTA skips such images anyway).
    """

    valid_processor_kwargs = MergeBridgeProcessorKwargs

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int = 1,
        image_token: str = "<image>",
        max_length: int | None = None,
        prompt_templates: dict[str, str] | None = None,
        chat_template: str | None = None,
        patch_size: int | None = None,
        object_classes: list[str] | None = None,
        attributes: list[str] | None = None,
        synonyms: dict[str, list[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"MergeBridgeProcessor: num_image_tokens must be a positive int, got {num_image_tokens!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"MergeBridgeProcessor: max_length must be a positive int, got {max_length!r}")
        if patch_size is not None and (not isinstance(patch_size, int) or isinstance(patch_size, bool)
                                       or patch_size < 1):
            raise ValueError(f"MergeBridgeProcessor: patch_size must be a positive int, got {patch_size!r}")
        self.num_image_tokens = num_image_tokens
        self.patch_size = patch_size
        self.object_classes, self.attributes = list(object_classes or []), list(attributes or [])
        self.synonyms = dict(synonyms or {})
        self.image_token = image_token
        self.prompt_templates = dict(prompt_templates or PROMPT_TEMPLATES)
        if chat_template is None:
            chat_template = default_chat_template(image_token, self.prompt_templates)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.max_length = max_length if max_length is not None else tokenizer_limit(self.tokenizer)
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
            kwargs.setdefault("patch_size", config.vision_config.patch_size)
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

    def _get_num_multimodal_tokens(
        self, image_sizes: Sequence[Sequence[int]] | None = None, video_sizes: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> MultiModalData:
        """Tokens one `<image>` expands into, per image / video of the given (height, width) or (frames, height,
        width): always `num_image_tokens`, since the merging schedule fixes the count before the forward pass."""
        data: dict[str, list[int]] = {}
        if image_sizes is not None:
            data.update(num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes))
        if video_sizes is not None:
            data["num_video_tokens"] = [self.num_image_tokens] * len(video_sizes)
        return MultiModalData(**data)

    def _visual_inputs(self, images: Any, videos: Any) -> tuple[list[Any] | None, list[list[Any]] | None]:
        """Flat list of RGB images (one per placeholder) or list of RGB frame lists; a bad one named by index."""
        if videos is not None:
            if images is not None:
                raise ValueError("MergeBridgeProcessor: pass images= or videos=, not both")
            clips = []
            for i, clip in enumerate(videos):
                if clip is None or len(clip) == 0:
                    raise ValueError(f"MergeBridgeProcessor: video {i} has zero frames")
                clips.append(prepare_images(list(clip), self.image_processor, "MergeBridgeProcessor", f"video {i} frame"))
            lengths = {len(clip) for clip in clips}
            if len(lengths) != 1:
                raise ValueError(f"MergeBridgeProcessor: videos in a batch need equal frame counts, got {sorted(lengths)}")
            return None, clips
        if images is None:
            return None, None
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            flat = list(images)  # (B, ...) batch
        elif not isinstance(images, (str, np.ndarray, torch.Tensor)) and hasattr(images, "__len__"):
            # lists, tuples, datasets columns; a nested list holds one sample's images (a PIL image has no len)
            flat = [x for sample in images for x in (sample if isinstance(sample, (list, tuple)) else [sample])]
        else:
            flat = [images]
        return prepare_images(flat, self.image_processor, "MergeBridgeProcessor"), None

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: Sequence[Sequence[Any]] | None = None,
        targets: str | Sequence[str] | None = None,
        audio: None = None,
        boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
        box_labels: Sequence[Sequence[str] | None] | None = None,
        box_attributes: Sequence[Sequence[Sequence[str]] | None] | None = None,
        box_features: Sequence[Sequence[Sequence[float]] | None] | None = None,
        **kwargs: Unpack[MergeBridgeProcessorKwargs],
    ) -> BatchFeature:
        """Tokenise prompts (with `<image>` expanded), process images or videos, and build labels for targets.

        Prompts without any `<image>` get one prepended when images/videos are given (PaliGemma-style); with
        images but no text every sample gets the caption prompt. `return_mm_token_type_ids=True` adds
        `mm_token_type_ids` (1 on image tokens) and `return_text_replacement_offsets=True` the character spans of
        each expanded placeholder (transformers' format).
        """
        if images is None and videos is None and text is None:
            raise ValueError("MergeBridgeProcessor: nothing to process; give images=, videos= and/or text=")
        if audio is not None:
            raise ValueError("MergeBridgeProcessor: audio is not supported")
        check_kwargs(kwargs, MergeBridgeProcessorKwargs, self.image_processor, "MergeBridgeProcessor")
        # the tokenizer's padding side is left out on purpose: the side follows the task (see the class docstring)
        tokenizer_init = {k: v for k, v in self.tokenizer.init_kwargs.items() if k != "padding_side"}
        merged = self._merge_kwargs(MergeBridgeProcessorKwargs, tokenizer_init_kwargs=tokenizer_init, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        # transformers 5.18 has these as text kwargs, 5.24 as flat ones (mirrored into text_kwargs)
        return_mm_ids = text_kwargs.pop("return_mm_token_type_ids", None) or merged.get("return_mm_token_type_ids")
        return_offsets = (text_kwargs.pop("return_text_replacement_offsets", None)
                          or merged.get("return_text_replacement_offsets"))
        # common_kwargs reach every modality; keys that are no text kwarg at all are the other modalities'
        text_kwargs = {k: v for k, v in text_kwargs.items() if k in TextKwargs.__annotations__}
        unsupported = sorted(k for k, v in text_kwargs.items() if k not in _TEXT_KWARGS and v not in (None, False))
        if unsupported:
            raise ValueError(f"MergeBridgeProcessor: text kwargs {unsupported} are not supported")
        if text_kwargs.get("truncation") not in (None, False, "do_not_truncate"):
            raise ValueError("MergeBridgeProcessor: truncation is not supported (it would cut image tokens or targets); "
                             "inputs longer than max_length are an error")
        max_length = self._call_max_length(text_kwargs.get("max_length"))

        flat_images, clips = self._visual_inputs(images, videos)
        visual = flat_images if clips is None else clips
        num_visual = 0 if visual is None else len(visual)
        if text is None:
            text = [self.prompt_templates["caption"]] * num_visual
        prompts = [text] if isinstance(text, str) else list(text)
        check_texts(prompts, "MergeBridgeProcessor", "text")
        if targets is not None:
            targets = [targets] if isinstance(targets, str) else list(targets)
            if len(targets) != len(prompts):
                raise ValueError(f"MergeBridgeProcessor: {len(targets)} targets for {len(prompts)} prompts")
            check_texts(targets, "MergeBridgeProcessor", "targets")
        placeholders = sum(p.count(self.image_token) for p in prompts)
        if num_visual and placeholders == 0:
            if num_visual != len(prompts):
                raise ValueError(f"MergeBridgeProcessor: {num_visual} images/videos for {len(prompts)} text prompts "
                                 f"without {self.image_token!r}; give one per prompt or place the placeholders")
            prompts = [self.image_token + p for p in prompts]
            placeholders = len(prompts)
        if placeholders != num_visual:
            raise ValueError(
                f"MergeBridgeProcessor: {num_visual} images/videos but {placeholders} {self.image_token!r} "
                "placeholders in text; give one image per placeholder"
            )
        replacement = self.image_token * self.num_image_tokens
        expanded, offsets = self.get_text_with_replacements(list(prompts), [replacement] * placeholders)
        sequences, label_rows = self._tokenize(expanded, targets, max_length, text_kwargs.get("add_special_tokens"))
        side = text_kwargs.get("padding_side") or ("left" if targets is None else "right")
        data = self._pad(sequences, label_rows if targets is not None else None, text_kwargs, max_length, side)
        if return_mm_ids:
            types = self.create_mm_token_type_ids(data["input_ids"])  # 1 on image tokens, 0 elsewhere
            data["mm_token_type_ids"] = np.array(types, dtype=np.int64) if isinstance(data["input_ids"], np.ndarray) else types
        if return_offsets:
            data["text_replacement_offsets"] = offsets
        if flat_images is not None:
            data["pixel_values"] = self.image_processor(flat_images, **images_kwargs)["pixel_values"]  # (B, C, H, W)
        if boxes is not None:
            data.update(self._box_targets(flat_images, prompts, images_kwargs, boxes, box_labels, box_attributes,
                                          box_features))
        elif clips is not None:
            frames = [frame for clip in clips for frame in clip]
            pixels = self.image_processor(frames, **{**images_kwargs, "return_tensors": "pt"})["pixel_values"]
            data["pixel_values"] = pixels.view(len(clips), len(clips[0]), *pixels.shape[1:])  # (B, T, C, H, W)
        return BatchFeature(data, tensor_type=text_kwargs.get("return_tensors"),
                            skip_tensor_conversion=["text_replacement_offsets"])

    def _box_targets(self, images: list[Any] | None, prompts: list[str], images_kwargs: dict[str, Any],
                     boxes: Sequence[Any], box_labels: Any, box_attributes: Any, box_features: Any) -> dict[str, Any]:
        """Patch-level targets per image, built by `PatchAlignProcessor` with each image's prompt text (placeholders
        removed) as the text that makes a box relevant."""
        if images is None:
            raise ValueError("MergeBridgeProcessor: boxes need images= (videos have no per-frame boxes)")
        if self.patch_size is None:
            raise ValueError("MergeBridgeProcessor: boxes need patch_size (the vision tower's); build the processor "
                             "with patch_size= or from_vision_text_pretrained(config=...)")
        changed = sorted(k for k in _GEOMETRY_KWARGS if k in images_kwargs)
        if changed:
            raise ValueError(f"MergeBridgeProcessor: image kwargs {changed} change the resize / crop geometry, which "
                             "the boxes cannot follow; set them on the image processor instead")
        texts = [p.replace(self.image_token, " ").strip() for p in prompts for _ in range(p.count(self.image_token))]
        boxer = PatchAlignProcessor(self.image_processor, self.tokenizer, patch_size=self.patch_size,
                                    object_classes=self.object_classes, attributes=self.attributes,
                                    synonyms=self.synonyms)
        out = boxer(images=images, text=texts, boxes=boxes, box_labels=box_labels, box_attributes=box_attributes,
                    box_features=box_features)
        return {k: v for k, v in out.items() if k not in ("pixel_values", "input_ids", "attention_mask",
                                                          "token_type_ids")}

    def _call_max_length(self, requested: int | None) -> int | None:
        """The bound of this call: the requested `max_length`, which may not exceed the LLM context."""
        if requested is None:
            return self.max_length
        if self.max_length is not None and requested > self.max_length:
            raise ValueError(f"MergeBridgeProcessor: max_length={requested} is larger than the LLM context "
                             f"(the processor's max_length={self.max_length})")
        return requested

    def _tokenize(self, expanded: list[str], targets: list[str] | None, max_length: int | None,
                  add_special: bool | None) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids per sample (BOS unless `add_special_tokens=False`, prompt, then target + EOS) and labels that
        are -100 everywhere but on the target."""
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None and add_special is not False else []
        sequences, label_rows = [], []
        for i, prompt in enumerate(expanded):
            ids = bos + tok(prompt, add_special_tokens=False)["input_ids"]
            labels = [IGNORE_INDEX] * len(ids)
            if targets is not None:
                target_ids = tok(" " + targets[i].strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids, labels = ids + target_ids, labels + target_ids
            if max_length is not None and len(ids) > max_length:
                raise ValueError(
                    f"MergeBridgeProcessor: sample {i} is {len(ids)} tokens (with {self.num_image_tokens} image "
                    f"tokens per image), longer than the LLM context max_length={max_length}"
                )
            sequences.append(ids)
            label_rows.append(labels)
        return sequences, label_rows

    def _pad(self, sequences: list[list[int]], label_rows: list[list[int]] | None, text_kwargs: dict[str, Any],
             max_length: int | None, side: str) -> dict[str, Any]:
        """`input_ids`, `attention_mask` (and `labels`) padded as `padding` / `pad_to_multiple_of` ask."""
        padding = text_kwargs.get("padding")
        lengths = [len(s) for s in sequences]
        if padding in (False, None, "do_not_pad"):
            if len(set(lengths)) > 1 and text_kwargs.get("return_tensors") is not None:
                raise ValueError(f"MergeBridgeProcessor: padding=False with samples of {sorted(set(lengths))} tokens "
                                 "cannot make tensors; pad or pass return_tensors=None")
            width = None
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("MergeBridgeProcessor: padding='max_length' needs max_length")
            width = max_length
        else:  # True / "longest"
            width = max(lengths)
        multiple = text_kwargs.get("pad_to_multiple_of")
        if width is not None and multiple:
            width = -(-width // multiple) * multiple
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for i, ids in enumerate(sequences):
            extra = 0 if width is None else width - len(ids)
            labels = label_rows[i] if label_rows is not None else []

            def padded(row: list[int], fill: int) -> list[int]:
                return [fill] * extra + row if side == "left" else row + [fill] * extra

            rows["input_ids"].append(padded(ids, pad_id))
            rows["attention_mask"].append(padded([1] * len(ids), 0))
            rows["labels"].append(padded(labels, IGNORE_INDEX))
        data: dict[str, Any] = {"input_ids": rows["input_ids"]}
        if text_kwargs.get("return_attention_mask") is not False:
            data["attention_mask"] = rows["attention_mask"]
        if label_rows is not None:
            data["labels"] = rows["labels"]
        if width is not None:
            data = {k: np.array(v, dtype=np.int64) for k, v in data.items()}  # (B, T)
        return data

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


__all__ = ["MergeBridgeProcessor", "MergeBridgeProcessorKwargs", "add_special_tokens", "default_chat_template",
           "IGNORE_INDEX", "PROMPT_TEMPLATES"]
