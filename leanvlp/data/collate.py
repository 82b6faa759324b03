"""Collators: rows of `to_pairs` -> model inputs through each family's processor, decoding images on the way.

Both recipes use them: training as Trainer's `data_collator`, evaluation for MergeBridge's prompts.
"""

from __future__ import annotations

import hashlib
from typing import Any

import PIL.Image
import torch
from transformers.utils import logging

from .pairs import decode_image

logger = logging.get_logger(__name__)


class ImageCollator:
    """Decodes each row's image; a corrupt one fails naming the sample, or is skipped and counted."""

    def __init__(self, processor: Any, task: str, skip_bad_samples: bool = False) -> None:
        self.processor, self.task, self.skip_bad_samples = processor, task, skip_bad_samples
        self.skipped: list[str] = []

    def images_and_rows(self, rows: list[dict[str, Any]]) -> tuple[list[PIL.Image.Image], list[dict[str, Any]]]:
        """The decoded images and the rows they belong to (unreadable ones skipped when allowed)."""
        images, kept = [], []
        for row in rows:
            try:
                images.append(decode_image(row["image"], row["image_id"]))
                kept.append(row)
            except ValueError as err:
                if not self.skip_bad_samples:
                    raise ValueError(f"{err} (use --skip_bad_samples to skip and count such samples)") from err
                self.skipped.append(row["image_id"])
                logger.warning(f"skipping sample {row['image_id']!r}: {err}")
        if not kept:
            raise ValueError(f"every sample of a batch was unreadable: {[r['image_id'] for r in rows]}")
        return images, kept


class MergeBridgeCollator(ImageCollator):
    """Rows of `to_pairs` -> MergeBridge inputs via its processor (prompt template per task, labels on targets)."""

    def prompt(self, question: str) -> str:
        """The processor's prompt template for the task (VQA: with the question)."""
        if self.task == "vqa":
            return self.processor.build_prompt("vqa", question=question)
        return self.processor.build_prompt("caption")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images, rows = self.images_and_rows(rows)
        return dict(self.processor(images=images, text=[self.prompt(r["question"]) for r in rows],
                                   targets=[r["target"] for r in rows]))


def sample_seed(image_id: str, text: str, epoch: int, seed: int) -> int:
    """A 63-bit seed that depends only on the sample, the epoch and the run's seed (never on the process)."""
    digest = hashlib.blake2b(f"{seed}|{epoch}|{image_id}|{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class PatchAlignCollator(ImageCollator):
    """Rows of `to_pairs(..., annotations=True)` -> PatchAlign inputs via `PatchAlignProcessor`.

    pretrain / retrieval: image + caption (+ boxes, labels, attributes, teacher features for the patch-level
    targets when `boxes=True`; samples without boxes are masked out of those losses) and `sample_seeds` that
    fix each sample's MLM mask (see `mask_tokens`). caption: decoder tokens with labels (padding -100). vqa: the
    question as `question_input_ids`, the answer as decoder tokens with labels. `epoch` is kept current by
    `CollatorEpoch`, so a sample is masked differently in each epoch.
    """

    def __init__(self, processor: Any, task: str, skip_bad_samples: bool = False, boxes: bool = False,
                 region_features: bool = False, seed: int = 0) -> None:
        super().__init__(processor, task, skip_bad_samples)
        self.boxes, self.region_features, self.seed, self.epoch = boxes, region_features, seed, 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images, rows = self.images_and_rows(rows)
        proc, targets = self.processor, [r["target"] for r in rows]
        if self.task == "vqa":
            question = proc.tokenizer([r["question"] for r in rows], padding=True, truncation=True,
                                      max_length=proc.max_length, return_tensors="pt")
            batch = dict(proc(images=images, text=targets))
            batch.update(question_input_ids=question["input_ids"], question_attention_mask=question["attention_mask"])
        elif self.task == "caption":
            batch = dict(proc(images=images, text=targets))
        else:
            annotations: dict[str, Any] = {}
            if self.boxes and any(r.get("boxes") for r in rows):
                annotations = {"boxes": [r.get("boxes") or [] for r in rows],
                               "box_labels": [r.get("box_labels") or [] for r in rows]}
                if proc.attributes:
                    annotations["box_attributes"] = [r.get("box_attributes") or [] for r in rows]
                if self.region_features:
                    annotations["box_features"] = [r.get("box_features") or [] for r in rows]
            batch = dict(proc(images=images, text=targets, **annotations))
            batch["sample_seeds"] = torch.tensor([sample_seed(r["image_id"], r["target"], self.epoch, self.seed)
                                                  for r in rows], dtype=torch.long)
            return batch
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (B, T)
        return batch
