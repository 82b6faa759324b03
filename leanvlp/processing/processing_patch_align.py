"""PatchAlignProcessor: image processor + BERT tokenizer + the box machinery for patch-level targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs, TextKwargs, Unpack

from .boxes import (
    geometry_from_image_processor,
    is_text_relevant,
    names_to_ids,
    patch_labels_from_boxes,
    transform_boxes,
    validate_boxes,
)
from .inputs import check_kwargs, check_texts, prepare_images, tokenizer_limit

__all__ = ["PatchAlignProcessor", "PatchAlignProcessorKwargs"]

IGNORE_INDEX = -100
# image kwargs that change the resize / crop geometry the boxes are mapped with (read from the image processor)
_GEOMETRY_KWARGS = ("size", "crop_size", "do_resize", "do_center_crop", "do_pad", "pad_size", "default_to_square")


class PatchAlignProcessorKwargs(ProcessingKwargs, total=False):
    # return_tensors per modality, not in `common_kwargs`: 5.18 updates a `_defaults["common_kwargs"]` dict in place;
    # max_length's default is the processor's own `max_length` (an instance value, set in `__call__`)
    _defaults = {"text_kwargs": {"padding": True, "truncation": True, "return_tensors": "pt"},
                 "images_kwargs": {"return_tensors": "pt"}}


def _image_hw(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or an (H, W[, C]) array as stored, before any processing."""
    if hasattr(image, "size") and not isinstance(image, (np.ndarray, torch.Tensor)):
        width, height = image.size
        return height, width
    shape = tuple(image.shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        return shape[1], shape[2]  # channels first
    return shape[0], shape[1]


class PatchAlignProcessor(ProcessorMixin):
    r"""
    Builds PatchAlign inputs: `pixel_values`, `input_ids`, `attention_mask`, and from boxes the patch-level
    targets on the **processed** patch grid (boxes follow the image processor's resize / centre crop):

    - `patch_labels` (B, P) float, 1 where a patch overlaps a text-relevant box (its category or a synonym is a
      word of the caption); `pta_mask` (B,) bool, False for samples without boxes;
    - `class_labels` (B, P) long: the class of the smallest box covering the patch, background
      (= len(object_classes)) elsewhere, -100 for unannotated samples (needs `object_classes`);
    - `attribute_labels` (B, P, A) multi-hot of that box's attributes and `attribute_mask` (B, P) (needs
      `attributes` and `box_attributes`);
    - `region_box_masks` (B, M, P) bool, `region_features` (B, M, D), `region_mask` (B, M) (needs `box_features`).

    Args:
        image_processor: a PIL-backed image processor (e.g. `ViTImageProcessorPil`); torchvision is not needed.
        tokenizer: a BERT tokenizer.
        patch_size (`int`, defaults to 16): the vision tower's patch size.
        object_classes (`list[str]`, *optional*): class vocabulary (unknown labels are an error when set).
        attributes (`list[str]`, *optional*): attribute vocabulary.
        synonyms (`dict[str, list[str]]`, *optional*): extra caption words that make a category text-relevant.
        min_overlap (`float`, defaults to 0.0): minimum fraction of a patch a box must cover to mark it
            (0.0 = any positive-area overlap).
        max_length (`int`, defaults to 32): text truncation length: the default of the standard `max_length`
            text kwarg (a call's `max_length=` / `text_kwargs=` override it).
        max_position_embeddings (`int`, *optional*): the text encoder's positions; a `max_length` above it (here or
            in a call) is an error, not a crash in the position embedding. `from_vision_text_pretrained(config=)`
            sets it; otherwise the tokenizer's `model_max_length`, when that is a real size, is the bound.
        chat_template (`str`, *optional*): kept, saved as `chat_template.jinja` and reloaded (none by default:
            PatchAlign has no prompt format).

    Keyword arguments follow transformers' `ProcessingKwargs` (flat, per modality, `common_kwargs=`; precedence
    call > modality dict > common > tokenizer init > class defaults). With boxes, the image kwargs that change the
    resize / crop geometry are refused: the boxes follow the image processor's own settings.
    """

    valid_processor_kwargs = PatchAlignProcessorKwargs

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int = 16,
        object_classes: list[str] | None = None,
        attributes: list[str] | None = None,
        synonyms: dict[str, list[str]] | None = None,
        min_overlap: float = 0.0,
        max_length: int = 32,
        max_position_embeddings: int | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"PatchAlignProcessor: patch_size must be a positive int, got {patch_size!r}")
        if not 0.0 <= min_overlap <= 1.0:
            raise ValueError(f"PatchAlignProcessor: min_overlap must be in [0, 1], got {min_overlap!r}")
        self.patch_size = patch_size
        self.object_classes = list(object_classes or [])
        self.attributes = list(attributes or [])
        self.synonyms = dict(synonyms or {})
        self.min_overlap = min_overlap
        self.max_length = max_length
        self.max_position_embeddings = max_position_embeddings
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self._check_max_length(max_length, "max_length")

    def _check_max_length(self, value: Any, field: str) -> None:
        """`value` must fit the text encoder: at most `max_position_embeddings` (else the tokenizer's limit)."""
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"PatchAlignProcessor: {field} must be a positive int, got {value!r}")
        if self.max_position_embeddings is not None:
            limit, name = self.max_position_embeddings, "max_position_embeddings"
        else:
            limit, name = tokenizer_limit(self.tokenizer), "the tokenizer's model_max_length"
        if limit is not None and value > limit:
            raise ValueError(f"PatchAlignProcessor: {field}={value} is larger than the text encoder's positions "
                             f"({name}={limit})")

    @classmethod
    def from_vision_text_pretrained(cls, vision: str, text: str, config: Any = None, **kwargs: Any) -> "PatchAlignProcessor":
        """Image processor (PIL backend) of a vision checkpoint + tokenizer of a BERT checkpoint.

        With a `PatchAlignConfig`, patch size and vocabularies come from it.
        """
        image_processor = AutoImageProcessor.from_pretrained(vision, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(text)
        if config is not None:
            kwargs.setdefault("max_position_embeddings", config.text_config.max_position_embeddings)
            kwargs.setdefault("patch_size", config.vision_config.patch_size)
            kwargs.setdefault("object_classes", config.object_classes)
            kwargs.setdefault("attributes", config.attributes)
        return cls(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
        box_labels: Sequence[Sequence[str] | None] | None = None,
        box_attributes: Sequence[Sequence[Sequence[str]] | None] | None = None,
        box_features: Sequence[Sequence[Sequence[float]] | None] | None = None,
        videos: None = None,
        audio: None = None,
        **kwargs: Unpack[PatchAlignProcessorKwargs],
    ) -> BatchFeature:
        """`pixel_values` from the images (RGB, whatever the image processor's `do_convert_rgb`), `input_ids` /
        `attention_mask` from the text, and the patch-level targets from the boxes.

        Images and texts may differ in number (the retrieval head scores every image against every text); with
        boxes they are pairs, and unequal counts are an error naming both."""
        if images is None and text is None:
            raise ValueError("PatchAlignProcessor: nothing to process; give images= and/or text=")
        if videos is not None or audio is not None:
            raise ValueError("PatchAlignProcessor: videos and audio are not supported")
        check_kwargs(kwargs, PatchAlignProcessorKwargs, self.image_processor, "PatchAlignProcessor")
        merged = self._merge_kwargs(PatchAlignProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        images_kwargs = merged["images_kwargs"]
        # common_kwargs reach every modality; keys that are no text kwarg at all are the other modalities'
        text_kwargs = {k: v for k, v in merged["text_kwargs"].items() if k in TextKwargs.__annotations__}
        for key in ("return_mm_token_type_ids", "return_text_replacement_offsets"):
            if text_kwargs.pop(key, None) or merged.get(key):
                raise ValueError(f"PatchAlignProcessor: {key} is not supported (the text holds no image tokens)")
        text_kwargs.setdefault("max_length", self.max_length)
        self._check_max_length(text_kwargs["max_length"], "max_length")
        return_tensors = text_kwargs.get("return_tensors")
        if return_tensors != "pt" or images_kwargs.get("return_tensors") != "pt":
            raise ValueError(f"PatchAlignProcessor: only return_tensors='pt' is supported, got {return_tensors!r}")
        data: dict[str, Any] = {}
        if images is not None:
            single = isinstance(images, str) or hasattr(images, "size") and hasattr(images, "mode") or (
                isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3
            )
            images = [images] if single else list(images)  # lists, tuples, datasets columns, (B, ...) arrays
            images = prepare_images(images, self.image_processor, "PatchAlignProcessor")
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
            check_texts(text, "PatchAlignProcessor", "text")
        if boxes is not None:
            if images is None or text is None:
                raise ValueError("PatchAlignProcessor: boxes need images= (for the geometry) and text= (for relevance)")
            changed = sorted(k for k in _GEOMETRY_KWARGS if k in images_kwargs)
            if changed:
                raise ValueError(f"PatchAlignProcessor: image kwargs {changed} change the resize / crop geometry, which "
                                 "the boxes cannot follow; set them on the image processor instead")
        if images is not None:
            data["pixel_values"] = self.image_processor(images, **images_kwargs)["pixel_values"]  # (B, C, H, W)
        if text is not None:
            data.update(self.tokenizer(text, **text_kwargs))  # (B, L)
        if boxes is not None:
            data.update(self._box_targets(images, text, boxes, box_labels, box_attributes, box_features))
        return BatchFeature(data=data)

    def _box_targets(self, images, text, boxes, box_labels, box_attributes, box_features) -> dict[str, torch.Tensor]:
        B = len(images)
        for name, value in (("text", text), ("boxes", boxes), ("box_labels", box_labels),
                            ("box_attributes", box_attributes), ("box_features", box_features)):
            if value is not None and len(value) != B:
                raise ValueError(f"PatchAlignProcessor: {name} has {len(value)} entries for {B} images")
        if box_labels is None:
            raise ValueError("PatchAlignProcessor: boxes need box_labels (category names) for text relevance")
        data_hw = self._processed_hw(images[0])
        H, W = data_hw
        P = (H // self.patch_size) * (W // self.patch_size)
        num_classes, A = len(self.object_classes), len(self.attributes)
        patch_labels = torch.zeros(B, P)
        pta_mask = torch.zeros(B, dtype=torch.bool)
        class_labels = torch.full((B, P), IGNORE_INDEX, dtype=torch.long)
        attribute_labels, attribute_mask = torch.zeros(B, P, A), torch.zeros(B, P, dtype=torch.bool)
        M = max([len(b or []) for b in boxes] + [1])
        D = max([len(f[0]) for f in (box_features or []) if f] + [0])
        region_masks = torch.zeros(B, M, P, dtype=torch.bool)
        region_features, region_mask = torch.zeros(B, M, D), torch.zeros(B, M, dtype=torch.bool)
        for i in range(B):
            sample_boxes = boxes[i] or []
            if len(sample_boxes) == 0:
                continue  # unannotated: masked out of every box loss
            labels = list(box_labels[i] or [])
            if len(labels) != len(sample_boxes):
                raise ValueError(f"PatchAlignProcessor: sample {i} has {len(sample_boxes)} boxes but {len(labels)} box_labels")
            height, width = _image_hw(images[i])
            xywh = validate_boxes(sample_boxes, height, width, field=f"boxes[{i}]")
            geo = geometry_from_image_processor(self.image_processor, height, width)
            if (geo.out_height, geo.out_width) != data_hw:
                raise ValueError(f"PatchAlignProcessor: image {i} processes to {(geo.out_height, geo.out_width)}, not {data_hw}")
            xyxy = transform_boxes(xywh, geo)
            marks = torch.from_numpy(patch_labels_from_boxes(xyxy, H, W, self.patch_size, self.min_overlap))  # (m, P)
            relevant = torch.tensor([is_text_relevant(c, text[i], self.synonyms) for c in labels], dtype=torch.bool)
            patch_labels[i] = (marks & relevant[:, None]).any(0).float()
            pta_mask[i] = True
            # smaller boxes win where boxes overlap: assign from the largest to the smallest
            areas = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
            order = np.argsort(-areas, kind="stable")
            if num_classes:
                ids = names_to_ids(labels, self.object_classes, f"box_labels[{i}]")
                class_labels[i] = num_classes  # background
                for m in order:
                    class_labels[i, marks[m]] = ids[m]
            if A and box_attributes is not None and box_attributes[i]:
                if len(box_attributes[i]) != len(labels):
                    raise ValueError(f"PatchAlignProcessor: sample {i} has {len(labels)} boxes but "
                                     f"{len(box_attributes[i])} box_attributes")
                for m in order:
                    hot = torch.zeros(A)
                    hot[names_to_ids(box_attributes[i][m], self.attributes, f"box_attributes[{i}][{m}]")] = 1.0
                    attribute_labels[i, marks[m]] = hot
                attribute_mask[i] = marks.any(0)
            if box_features is not None and box_features[i]:
                feats = torch.as_tensor(np.asarray(box_features[i], dtype=np.float32))
                if feats.shape != (len(labels), D):
                    raise ValueError(f"PatchAlignProcessor: box_features[{i}] has shape {tuple(feats.shape)}, "
                                     f"expected ({len(labels)}, {D})")
                n = len(labels)
                region_masks[i, :n], region_features[i, :n] = marks, feats
                region_mask[i, :n] = marks.any(1)  # a box cropped away has nothing to pool
        out = {"patch_labels": patch_labels, "pta_mask": pta_mask}
        if num_classes:
            out["class_labels"] = class_labels
        if A and box_attributes is not None:
            out.update(attribute_labels=attribute_labels, attribute_mask=attribute_mask)
        if box_features is not None and D:
            out.update(region_box_masks=region_masks, region_features=region_features, region_mask=region_mask)
        return out

    def _processed_hw(self, image: Any) -> tuple[int, int]:
        geo = geometry_from_image_processor(self.image_processor, *_image_hw(image))
        return geo.out_height, geo.out_width
