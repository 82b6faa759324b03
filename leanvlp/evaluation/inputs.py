"""Model inputs on the model's device and dtype, shared by every task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch


def to_model(batch: Any, model: Any) -> Any:
    """A processor batch on the model's device, floating tensors (pixels) in the model's dtype."""
    return batch.to(model.device).to(model.dtype)


def pixels_on_model(processor: Any, images: Sequence[PIL.Image.Image], model: Any) -> torch.Tensor:
    """The images' pixel values from the processor's image processor, on the model's device and dtype."""
    pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    return pixels.to(model.device, model.dtype)  # (B, 3, H, W)
