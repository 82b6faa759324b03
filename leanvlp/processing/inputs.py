"""Input checks shared by the processors: images to RGB, text a tokenizer can encode, kwargs and length limits.

This folder is copied to the Hub as remote code, so it cannot import `leanvlp.data`; the data side imports `to_rgb`
from here instead (`leanvlp.data.to_rgb` is this function).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

__all__ = ["to_rgb", "prepare_images", "check_texts", "check_kwargs", "tokenizer_limit", "LARGEST_SANE_LENGTH"]

# tokenizers without a known context report model_max_length = int(1e30); anything above this is "unknown"
LARGEST_SANE_LENGTH = 10**9


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16 ...) as RGB; transparent pixels become white, not black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit grey to 8-bit grey
    return image.convert("RGB")


def prepare_images(images: Sequence[Any], image_processor: Any, owner: str, what: str = "image") -> list[Any]:
    """Each image decoded and RGB (whatever the image processor's `do_convert_rgb`); a missing or unreadable
    image is an error naming its index. Arrays and tensors pass through unchanged (they have no PIL mode)."""
    out = []
    for i, image in enumerate(images):
        if image is None:
            raise ValueError(f"{owner}: {what} {i} is None")
        if isinstance(image, str):  # a URL or a path, loaded the way transformers loads them
            try:
                image = image_processor.fetch_images(image)
            except Exception as err:
                raise ValueError(f"{owner}: {what} {i} ({image!r}) could not be loaded: {err}") from err
        if isinstance(image, PIL.Image.Image):
            try:
                image.load()  # a truncated or corrupt file fails here, not deep inside the image processor
            except Exception as err:
                raise ValueError(f"{owner}: {what} {i} could not be decoded: {err}") from err
            image = to_rgb(image)
        elif not isinstance(image, (np.ndarray, torch.Tensor)):
            raise ValueError(f"{owner}: {what} {i} is a {type(image).__name__}, expected a PIL image, an array or a tensor")
        out.append(image)
    return out


def check_texts(texts: Sequence[Any], owner: str, field: str = "text") -> None:
    """Every sample a str that encodes as UTF-8 (a lone surrogate would surface as a tokenizer TypeError)."""
    for i, value in enumerate(texts):
        if not isinstance(value, str):
            raise ValueError(f"{owner}: {field}[{i}] must be a str, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{owner}: {field}[{i}] is not valid text: {value[err.start:err.end]!r} at position {err.start} "
                f"cannot be encoded as UTF-8 (a lone surrogate?)"
            ) from None


def check_kwargs(kwargs: dict[str, Any], kwargs_class: Any, image_processor: Any, owner: str) -> None:
    """Unknown keyword arguments are an error (transformers would only warn and drop them)."""
    annotations = kwargs_class.__annotations__
    valid = {"common_kwargs", *annotations}
    for key, typed in annotations.items():
        valid.update(getattr(typed, "__annotations__", {}))
    valid.update(getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {}))
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"{owner} got unexpected arguments: {unknown}")


def tokenizer_limit(tokenizer: Any) -> int | None:
    """The tokenizer's `model_max_length` when it is a real context size (None for the 1e30 placeholder)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit <= LARGEST_SANE_LENGTH else None
