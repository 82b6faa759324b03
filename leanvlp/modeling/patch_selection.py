"""COPA's text-aware patch detector (TPD) and the patch-text alignment (PTA) loss.

After ViT block k the detector scores every patch token, s_i = sigmoid(MLP([x_i ; t])), with t the
text [CLS] embedding; the top K = round(keep_ratio * P) patches stay (in their spatial order) and
the rest are fused into one token, weighted by the softmax of their detector logits (the default:
softmax(z_i) is proportional to the odds s_i / (1 - s_i)) or of their scores s_i (`fuse_weights`;
s_i in (0, 1) caps the ratio of any two weights at e, so that fuse is nearly a plain mean). Later blocks then see
CLS + K + 1 tokens. With keep_ratio 1.0 every patch is kept and no fused token is added, so the
tower's output equals the unpruned tower's exactly.

A text-agnostic mode scores patches without any text (cosine similarity of each patch with the
CLS token at block k, a parameter-free proxy of CLS attention), for paths whose image embedding
must not depend on the paired text (ITC, retrieval indexing).

The pruning runs as a `BlockHook` of the shared block loop (`token_merging.py`); it keeps
`state.sizes` / `state.sources` consistent: a kept token keeps its size and sources, the fused
token holds the sum of the fused sizes and the union of their sources. When the blocks before it
merged tokens (ToMe), the detector scores the merged tokens, and `group_patch_labels` carries PTA's
per-patch labels to them through their sources.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .configuration_patch_align import FUSE_WEIGHTS, SELECTIONS
from .token_merging import BlockHook, MergeState

__all__ = [
    "num_kept_patches",
    "select_and_fuse",
    "cls_similarity_scores",
    "TextAwarePatchDetector",
    "PatchSelectionHook",
    "DualPatchSelectionHook",
    "group_patch_labels",
    "pta_loss",
]


def num_kept_patches(num_patches: int, keep_ratio: float) -> int:
    """K = round(keep_ratio * P), at least 1."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return max(1, min(num_patches, round(keep_ratio * num_patches)))


def select_and_fuse(
    hidden: Tensor,
    scores: Tensor,
    keep: int,
    sizes: Tensor | None = None,
    sources: Tensor | None = None,
    num_prefix: int = 1,
    fuse_scores: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Keep the `keep` best-scoring patches, fuse the rest into one token.

    hidden (B, N, C) with `num_prefix` leading tokens (CLS) that always stay; scores (B, P) for the
    P = N - num_prefix patches (higher = more relevant). The fused token is the softmax(fuse_scores)-weighted
    mean of the dropped patches; fuse_scores (B, P) defaults to `scores` and must rank like them (the
    detector passes its logits while ranking by their sigmoid). Returns hidden (B, num_prefix + K + 1, C)
    (no fused token when K == P), sizes, sources and the kept patch indices (B, K), sorted.
    """
    B, N, C = hidden.shape
    P = N - num_prefix
    fuse_scores = scores if fuse_scores is None else fuse_scores
    for name, value in (("scores", scores), ("fuse_scores", fuse_scores)):
        if value.shape != (B, P):
            raise ValueError(f"{name} must have shape {(B, P)}, got {tuple(value.shape)}")
    prefix, patches = hidden[:, :num_prefix], hidden[:, num_prefix:]  # (B, n, C), (B, P, C)
    if keep >= P:
        return hidden, sizes, sources, torch.arange(P, device=hidden.device).expand(B, P)
    order = scores.argsort(dim=1, descending=True)  # (B, P)
    kept = order[:, :keep].sort(dim=1).values  # (B, K) spatial order
    dropped = order[:, keep:]  # (B, P - K)

    def take(t: Tensor, idx: Tensor) -> Tensor:  # gather along the token axis of a (B, P, D) tensor
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    weights = fuse_scores.gather(1, dropped).softmax(dim=1)[..., None]  # (B, P - K, 1)
    fused = (weights * take(patches, dropped)).sum(1, keepdim=True)  # (B, 1, C)
    out = torch.cat([prefix, take(patches, kept), fused], dim=1)  # (B, n + K + 1, C)
    if sizes is not None:
        s_pre, s_pat = sizes[:, :num_prefix], sizes[:, num_prefix:]
        sizes = torch.cat([s_pre, take(s_pat, kept), take(s_pat, dropped).sum(1, keepdim=True)], dim=1)
    if sources is not None:
        src_pre, src_pat = sources[:, :num_prefix], sources[:, num_prefix:]
        fused_src = take(src_pat.float(), dropped).sum(1, keepdim=True)
        fused_src = fused_src > 0 if sources.dtype == torch.bool else fused_src
        sources = torch.cat([src_pre, take(src_pat, kept), fused_src.to(sources.dtype)], dim=1)
    return out, sizes, sources, kept


def cls_similarity_scores(hidden: Tensor, num_prefix: int = 1) -> Tensor:
    """Text-agnostic scores (B, P) in [0, 1]: (1 + cos(patch, CLS)) / 2."""
    cls, patches = hidden[:, :1], hidden[:, num_prefix:]
    return (1 + F.cosine_similarity(patches, cls, dim=-1)) / 2


class TextAwarePatchDetector(nn.Module):
    """s_i = sigmoid(MLP([x_i ; t])): LayerNorm on the patch token, a 2-layer GELU MLP, one logit."""

    def __init__(self, vision_size: int, text_size: int, hidden_size: int | None = None):
        super().__init__()
        hidden_size = hidden_size or vision_size
        self.norm = nn.LayerNorm(vision_size)
        self.fc1 = nn.Linear(vision_size + text_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, 1)

    def forward(self, patches: Tensor, text: Tensor) -> Tensor:
        """patches (B, P, C), text (B, T) -> logits (B, P)."""
        text = text[:, None].expand(-1, patches.shape[1], -1)  # (B, P, T)
        h = torch.cat([self.norm(patches), text], dim=-1)  # (B, P, C + T)
        return self.fc2(F.gelu(self.fc1(h))).squeeze(-1)


def _take_rows(state: MergeState, rows: Tensor) -> MergeState:
    """The block-loop state of the batch rows `rows` (n,), in that order (rows may repeat)."""
    return replace(state, **{name: None if getattr(state, name) is None else getattr(state, name)[rows]
                             for name in ("sizes", "sources", "relevance")})


class PatchSelectionHook(BlockHook):
    """Prunes the sequence after block `layer_idx`; one hook object per forward call.

    text (n, T) selects the text-aware detector; text=None the text-agnostic CLS-similarity scores.
    rows (n,) (text-aware only) pairs text j with batch row rows[j] of the tower (an image scored against
    several texts, e.g. ITM's pairs): the tower continues on n rows. Default: row j with text j.
    fuse_weights: the text-aware fused token's weights are a softmax over the dropped patches' detector
    "logits" or over their sigmoid "scores" (the latter lie in (0, 1), so their softmax is almost uniform);
    the text-agnostic scores have no logits and always weight by softmax(scores).
    selection (text-aware only): "detector" ranks the patches by the detector's scores; "cls_cosine" (the
    text-agnostic scores) and "random" (uniform draws from torch's global generator) are ablations that rank
    them instead while the detector still scores every patch (`logits`, for PTA); the fused token then weights
    the dropped patches by softmax(scores) of the ranking scores, so the detector decides nothing.
    After the call, `logits` (n, P) (text-aware only), `scores` (n, P) and `kept` (n, K) hold what
    the detector decided, for the PTA loss and for visualisation, and `token_sources` (n, P, N0) the
    scored tokens' sources when the block loop tracks them (P: tokens after earlier merging, if any).
    """

    def __init__(
        self,
        layer_idx: int,
        keep_ratio: float,
        detector: TextAwarePatchDetector | None = None,
        text: Tensor | None = None,
        num_prefix: int = 1,
        fuse_weights: str = "logits",
        rows: Tensor | None = None,
        selection: str = "detector",
    ):
        if text is not None and detector is None:
            raise ValueError("a text-aware PatchSelectionHook needs a detector")
        if fuse_weights not in FUSE_WEIGHTS:
            raise ValueError(f"PatchSelectionHook: fuse_weights must be one of {FUSE_WEIGHTS}, got {fuse_weights!r}")
        if rows is not None and (text is None or rows.shape != text.shape[:1]):
            raise ValueError("PatchSelectionHook: rows needs text, one row index per text "
                             f"(rows {None if rows is None else tuple(rows.shape)}, "
                             f"text {None if text is None else tuple(text.shape)})")
        if selection not in SELECTIONS:
            raise ValueError(f"PatchSelectionHook: selection must be one of {SELECTIONS}, got {selection!r}")
        num_kept_patches(1, keep_ratio)  # validates keep_ratio
        self.layer_idx, self.keep_ratio = layer_idx, keep_ratio
        self.detector, self.text, self.num_prefix = detector, text, num_prefix
        self.fuse_weights, self.rows, self.selection = fuse_weights, rows, selection
        self.logits: Tensor | None = None
        self.scores: Tensor | None = None
        self.kept: Tensor | None = None
        self.token_sources: Tensor | None = None

    def after_block(self, layer_idx: int, hidden: Tensor, state: MergeState) -> tuple[Tensor, MergeState]:
        if layer_idx != self.layer_idx:
            return hidden, state
        if self.rows is not None:
            hidden, state = hidden[self.rows], _take_rows(state, self.rows)  # (n, N, C)
        patches = hidden[:, self.num_prefix :]  # (n, P, C)
        if state.sources is not None:
            self.token_sources = state.sources[:, self.num_prefix :]  # (n, P, N0)
        fuse_scores = None
        if self.text is None:
            self.scores = cls_similarity_scores(hidden, self.num_prefix)
        else:
            self.logits = self.detector(patches, self.text)
            if self.selection == "detector":
                self.scores = self.logits.sigmoid()
                fuse_scores = self.logits if self.fuse_weights == "logits" else self.scores
            elif self.selection == "cls_cosine":
                self.scores = cls_similarity_scores(hidden, self.num_prefix)
            else:
                self.scores = torch.rand(patches.shape[:2], device=patches.device, dtype=patches.dtype)  # (n, P)
        keep = num_kept_patches(patches.shape[1], self.keep_ratio)
        hidden, sizes, sources, self.kept = select_and_fuse(
            hidden, self.scores, keep, state.sizes, state.sources, self.num_prefix, fuse_scores
        )
        return hidden, replace(state, sizes=sizes, sources=sources)


class DualPatchSelectionHook(BlockHook):
    """Text-agnostic and text-aware pruning from one shared prefix of blocks.

    Blocks 1..k run once on (B, N); after block k both hooks prune the same hidden states and the
    two results are stacked on the batch axis, so the remaining blocks run once on (2B, K + 2):
    rows [:B] are the text-agnostic branch, rows [B:] the text-aware one.
    """

    def __init__(self, agnostic: PatchSelectionHook, aware: PatchSelectionHook):
        if agnostic.layer_idx != aware.layer_idx or agnostic.keep_ratio != aware.keep_ratio:
            raise ValueError("DualPatchSelectionHook: both hooks must prune after the same block with the same keep ratio")
        self.agnostic, self.aware, self.layer_idx = agnostic, aware, agnostic.layer_idx

    def after_block(self, layer_idx: int, hidden: Tensor, state: MergeState) -> tuple[Tensor, MergeState]:
        if layer_idx != self.layer_idx:
            return hidden, state
        h_a, s_a = self.agnostic.after_block(layer_idx, hidden, state)
        h_t, s_t = self.aware.after_block(layer_idx, hidden, state)

        def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, b], dim=0)

        return torch.cat([h_a, h_t], dim=0), replace(state, sizes=cat(s_a.sizes, s_t.sizes), sources=cat(s_a.sources, s_t.sources))


def group_patch_labels(labels: Tensor, sources: Tensor, num_prefix: int = 1) -> Tensor:
    """PTA labels (B, P0) per original patch -> (B, P) per token that holds a group of them (sources (B, P, N0),
    N0 = num_prefix + P0): a token is relevant when any of its patches is, as a box marks any patch it overlaps."""
    groups = sources[:, :, num_prefix:]  # (B, P, P0)
    if groups.shape[0] != labels.shape[0] or groups.shape[-1] != labels.shape[-1]:
        raise ValueError(f"patch labels {tuple(labels.shape)} do not fit token sources {tuple(sources.shape)} "
                         f"(B, P0 = N0 - {num_prefix})")
    return (groups * labels[:, None, :].to(groups.dtype)).amax(dim=-1)  # (B, P)


def pta_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Patch-text alignment: BCE(s_i, y_i) per patch, mean per sample, mean over annotated samples.

    logits, labels (B, P); mask (B,) bool: samples with box annotations. Samples without
    annotations contribute nothing and do not dilute the mean; no annotated sample -> 0.
    """
    per_sample = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(1)
    mask = mask.to(per_sample.dtype)  # (B,)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1)
