"""Image-text retrieval recall R@K in both directions, from a similarity matrix.

`similarity[i, j]` scores image i against text j (higher = more similar); `text_to_image[j]` is the
image that text j describes, so an image may have several captions (COCO / Flickr: 5).
- image -> text: an image's rank is that of its best-ranked own caption among all texts;
- text -> image: a text's rank is that of its image among all images;
R@K is the fraction of queries whose rank is < K (ranks start at 0), and `r_mean` is the mean of
all reported recalls. Ties are counted against the query: a rank is the number of wrong
candidates scoring >= the best right one, so a constant similarity matrix earns no credit
(argsort-based code would break ties by index order instead). Values are in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _as_matrix(similarity: Any) -> np.ndarray:
    """A (num_images, num_texts) float64 array from a numpy array, torch tensor or nested lists."""
    if hasattr(similarity, "detach"):  # torch.Tensor, without importing torch here
        similarity = similarity.detach().float().cpu().numpy()
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"similarity must be a non-empty (num_images, num_texts) matrix, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("similarity contains NaN or inf values")
    return sim


def retrieval_ranks(
    similarity: Any, text_to_image: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the right answer: (image->text ranks (num_images,), text->image ranks (num_texts,))."""
    sim = _as_matrix(similarity)  # (I, T)
    num_images, num_texts = sim.shape
    if text_to_image is None:
        if num_images != num_texts:
            raise ValueError(
                f"similarity has shape {sim.shape}: without text_to_image it must be square (text j <-> image j)"
            )
        text_to_image = range(num_texts)
    owner = np.asarray(list(text_to_image))
    if owner.shape != (num_texts,):
        raise ValueError(f"text_to_image has {owner.size} entries, similarity has {num_texts} texts")
    if not np.issubdtype(owner.dtype, np.integer) or owner.min() < 0 or owner.max() >= num_images:
        raise ValueError(f"text_to_image must hold image indices in [0, {num_images}), got {owner.tolist()}")
    positive = owner[None, :] == np.arange(num_images)[:, None]  # (I, T): text j describes image i
    missing = np.flatnonzero(~positive.any(axis=1))
    if missing.size:
        raise ValueError(f"images {missing.tolist()} have no text in text_to_image: image->text recall is undefined")

    best_pos = np.where(positive, sim, -np.inf).max(axis=1, keepdims=True)  # (I, 1)
    i2t = ((sim >= best_pos) & ~positive).sum(axis=1)  # (I,)
    own = sim[owner, np.arange(num_texts)][None, :]  # (1, T): each text's score with its image
    t2i = ((sim >= own) & ~positive).sum(axis=0)  # (T,)
    return i2t, t2i


def retrieval_recall(
    similarity: Any, text_to_image: Sequence[int] | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"} (for the default ks)."""
    if len(ks) == 0 or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    i2t, t2i = retrieval_ranks(similarity, text_to_image)
    scores = {f"i2t_r{k}": float((i2t < k).mean()) for k in ks}
    scores |= {f"t2i_r{k}": float((t2i < k).mean()) for k in ks}
    scores["r_mean"] = sum(scores.values()) / len(scores)
    return scores


__all__ = ["retrieval_ranks", "retrieval_recall"]
