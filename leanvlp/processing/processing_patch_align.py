"""PatchAlignProcessor: image processor + BERT tokenizer + the box machinery for patch-level targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

from .boxes import (
    geometry_from_image_processor,
    is_text_relevant,
    names_to_ids,
    patch_labels_from_boxes,
    transform_boxes,
    validate_boxes,
)

__all__ = ["PatchAlignProcessor"]

IGNORE_INDEX = -100


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
        max_length (`int`, defaults to 32): text truncation length.
    """

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
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_vision_text_pretrained(cls, vision: str, text: str, config: Any = None, **kwargs: Any) -> "PatchAlignProcessor":
        """Image processor (PIL backend) of a vision checkpoint + tokenizer of a BERT checkpoint.

        With a `PatchAlignConfig`, patch size and vocabularies come from it.
        """
        image_processor = AutoImageProcessor.from_pretrained(vision, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(text)
        if config is not None:
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
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        if kwargs:
            raise TypeError(f"PatchAlignProcessor got unexpected arguments: {sorted(kwargs)}")
        if return_tensors != "pt":
            raise ValueError(f"PatchAlignProcessor: only return_tensors='pt' is supported, got {return_tensors!r}")
        data: dict[str, Any] = {}
        if images is not None:
            single = hasattr(images, "size") and hasattr(images, "mode") or (
                isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3
            )
            images = [images] if single else list(images)  # lists, tuples, datasets columns, (B, ...) arrays
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
            data.update(self.tokenizer(text, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"))
        if boxes is not None:
            if images is None or text is None:
                raise ValueError("PatchAlignProcessor: boxes need images= (for the geometry) and text= (for relevance)")
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
