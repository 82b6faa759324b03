"""Semantic visual heads on patch tokens (Yang, Liu, Lin 2023, our reading in methods.md §4).

Three switchable auxiliary losses that give an end-to-end model's patch tokens the object-class,
attribute and region-feature knowledge a detector's region features carry:

- object class: per patch, cross-entropy over `num_classes + 1` classes (the last is background);
- attributes: per patch inside a box, multi-label BCE over the attribute vocabulary;
- region feature: patch tokens pooled inside each box regress the teacher feature of that region
  (smooth-L1 or 1 - cosine).

The heads read either the full patch grid (a block before the patch detector prunes it) or a subset
of its patches (the kept ones after pruning): `patch_index` (B, K) then names each token's grid
position and every target is taken at those positions (a box with no kept patch counts as absent).

A switched-off head is never built (no parameters, no loss). Every loss is a mean over the
annotated items only (patches of annotated samples, patches inside boxes, valid boxes), so
samples without annotations contribute zero and do not dilute the batch's loss; a batch without
any annotated item gives an exact 0 that still touches the head's parameters (DDP-safe).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ObjectClassHead", "AttributeHead", "RegionFeatureHead", "SemanticHeads", "IGNORE_INDEX", "take_patches"]

IGNORE_INDEX = -100


def take_patches(targets: Tensor, patch_index: Tensor, dim: int = 1) -> Tensor:
    """targets with the patch axis `dim` (size P) reduced to the K positions patch_index (B, K), per sample."""
    shape = list(targets.shape)
    shape[dim] = patch_index.shape[1]
    index = patch_index.view(patch_index.shape[0], *([1] * (dim - 1)), patch_index.shape[1],
                             *([1] * (targets.dim() - dim - 1)))
    return targets.gather(dim, index.expand(shape))


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


class ObjectClassHead(nn.Module):
    """Per-patch classifier over object classes + background (index num_classes)."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.classifier = nn.Linear(hidden_size, num_classes + 1)

    def forward(self, patches: Tensor) -> Tensor:
        return self.classifier(self.norm(patches))  # (B, P, num_classes + 1)

    def loss(self, patches: Tensor, targets: Tensor) -> Tensor:
        """targets (B, P) long; IGNORE_INDEX where the sample carries no annotation."""
        logits = self(patches)
        per_patch = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none"
        )  # (B * P,)
        return _masked_mean(per_patch, targets.flatten() != IGNORE_INDEX)


class AttributeHead(nn.Module):
    """Per-patch multi-label attribute classifier, trained on patches inside boxes only."""

    def __init__(self, hidden_size: int, num_attributes: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.classifier = nn.Linear(hidden_size, num_attributes)

    def forward(self, patches: Tensor) -> Tensor:
        return self.classifier(self.norm(patches))  # (B, P, A)

    def loss(self, patches: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """targets (B, P, A) multi-hot; mask (B, P) bool: patch inside an annotated box."""
        per_patch = F.binary_cross_entropy_with_logits(self(patches), targets.to(patches.dtype), reduction="none")
        return _masked_mean(per_patch.mean(-1), mask)


class RegionFeatureHead(nn.Module):
    """Box-pooled patch tokens -> teacher feature space."""

    def __init__(self, hidden_size: int, teacher_size: int, loss_type: str = "smooth_l1"):
        super().__init__()
        if loss_type not in ("smooth_l1", "cosine"):
            raise ValueError(f"region loss_type must be 'smooth_l1' or 'cosine', got {loss_type!r}")
        self.loss_type = loss_type
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, teacher_size)

    def forward(self, patches: Tensor, box_masks: Tensor) -> Tensor:
        """patches (B, P, C), box_masks (B, M, P) bool -> predicted region features (B, M, D)."""
        weights = box_masks.to(patches.dtype)
        pooled = weights @ patches / weights.sum(-1, keepdim=True).clamp(min=1)  # (B, M, C)
        return self.proj(self.norm(pooled))

    def loss(self, patches: Tensor, box_masks: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        """targets (B, M, D) teacher features; valid (B, M) bool: a real box with a teacher feature."""
        pred = self(patches, box_masks)
        if targets.shape != pred.shape:  # a (B, M, 1) target would broadcast silently into the loss
            raise ValueError(
                f"RegionFeatureHead: region_features has feature size {targets.shape[-1]} but the head predicts "
                f"teacher_size={pred.shape[-1]} (PatchAlignConfig.teacher_size; value shape {tuple(targets.shape)})"
            )
        targets = targets.to(pred.dtype)
        if self.loss_type == "cosine":
            per_box = 1 - F.cosine_similarity(pred, targets, dim=-1)
        else:
            per_box = F.smooth_l1_loss(pred, targets, reduction="none").mean(-1)
        valid = valid & box_masks.any(-1)  # a box cropped away has no patches to pool
        return _masked_mean(per_box, valid)


class SemanticHeads(nn.Module):
    """The enabled heads only; `forward` returns {name: loss} for the heads whose targets are given."""

    def __init__(
        self,
        hidden_size: int,
        num_classes: int = 0,
        num_attributes: int = 0,
        teacher_size: int = 0,
        object_class: bool = False,
        attribute: bool = False,
        region_feature: bool = False,
        region_loss: str = "smooth_l1",
    ):
        super().__init__()
        if object_class:
            self.object_class = ObjectClassHead(hidden_size, num_classes)
        if attribute:
            self.attribute = AttributeHead(hidden_size, num_attributes)
        if region_feature:
            self.region_feature = RegionFeatureHead(hidden_size, teacher_size, region_loss)

    def forward(
        self,
        patches: Tensor,
        class_labels: Tensor | None = None,
        attribute_labels: Tensor | None = None,
        attribute_mask: Tensor | None = None,
        region_box_masks: Tensor | None = None,
        region_features: Tensor | None = None,
        region_mask: Tensor | None = None,
        patch_index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """patches (B, P, C) on the full grid, or (B, K, C) at the grid positions patch_index (B, K)."""
        if patch_index is not None:
            if patch_index.shape != patches.shape[:2]:
                raise ValueError(f"SemanticHeads: patch_index has shape {tuple(patch_index.shape)}, the patches "
                                 f"{tuple(patches.shape[:2])}")

            def take(t: Tensor | None, dim: int = 1) -> Tensor | None:
                return None if t is None else take_patches(t, patch_index, dim)

            class_labels, attribute_labels = take(class_labels), take(attribute_labels)
            attribute_mask = take(attribute_mask)
            region_box_masks = take(region_box_masks, 2)  # (B, M, K)
        losses: dict[str, Tensor] = {}
        if hasattr(self, "object_class") and class_labels is not None:
            losses["object_class"] = self.object_class.loss(patches, class_labels)
        if hasattr(self, "attribute") and attribute_labels is not None and attribute_mask is not None:
            losses["attribute"] = self.attribute.loss(patches, attribute_labels, attribute_mask)
        if hasattr(self, "region_feature") and region_features is not None and region_box_masks is not None:
            valid = region_mask if region_mask is not None else region_box_masks.any(-1)
            losses["region_feature"] = self.region_feature.loss(patches, region_box_masks, region_features, valid)
        return losses
