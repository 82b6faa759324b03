"""Soft attentive temporal token merging (EVLGen's video path), as a block hook of the token-merging loop.

In every vision block, between attention and MLP, each spatial position attends over its T frames:
q = Wq x, k = Wk x (C -> dim, `heads` heads), v = x split into the same heads (no value projection), and
out = x + alpha * softmax(q k^T / sqrt(dim)) v with a scalar gate alpha initialised to 0. With alpha = 0 the
tower is the per-frame image tower, so video features start as the frame-mean of image features.
Only these parameters train inside a frozen tower.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .token_merging import BlockHook, MergeState


class TemporalAttention(nn.Module):
    """One block's temporal attention over frames, gated by a zero-initialised scalar."""

    def __init__(self, hidden_size: int, dim: int = 256, heads: int = 8) -> None:
        super().__init__()
        if dim % heads or hidden_size % heads:
            raise ValueError(
                f"TemporalAttention: dim={dim} and hidden_size={hidden_size} must both divide by heads={heads}"
            )
        self.heads, self.dim = heads, dim
        self.query = nn.Linear(hidden_size, dim)
        self.key = nn.Linear(hidden_size, dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        bt, n, c = x.shape  # (B*T, N, C), frames of one clip are consecutive
        b, t, h = bt // num_frames, num_frames, self.heads
        x5 = x.view(b, t, n, c).transpose(1, 2)  # (B, N, T, C): each position sees its T frames
        q = self.query(x5).view(b, n, t, h, self.dim // h).transpose(2, 3)  # (B, N, h, T, d)
        k = self.key(x5).view(b, n, t, h, self.dim // h).transpose(2, 3)  # (B, N, h, T, d)
        v = x5.reshape(b, n, t, h, c // h).transpose(2, 3)  # (B, N, h, T, C/h)
        # Scale by the full width (sqrt(dim)), as in EVLGen, not by the per-head width.
        mixed = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.dim**-0.5)
        mixed = mixed.transpose(2, 3).reshape(b, n, t, c).transpose(1, 2).reshape(bt, n, c)  # (B*T, N, C)
        return x + self.gate * mixed


class TemporalTokenMerging(nn.Module):
    """Per-block temporal attention modules; `hook(num_frames)` gives the hook for one forward pass."""

    def __init__(self, hidden_size: int, num_layers: int, dim: int = 256, heads: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TemporalAttention(hidden_size, dim, heads) for _ in range(num_layers))

    def hook(self, num_frames: int) -> BlockHook:
        if num_frames < 1:
            raise ValueError(f"TemporalTokenMerging: num_frames must be >= 1, got {num_frames}")
        return _TemporalHook(self, num_frames)


class _TemporalHook(BlockHook):
    def __init__(self, owner: TemporalTokenMerging, num_frames: int) -> None:
        self.owner, self.num_frames = owner, num_frames

    def after_attention(self, layer_idx: int, hidden: Tensor, state: MergeState) -> tuple[Tensor, MergeState]:
        return self.owner.layers[layer_idx](hidden, self.num_frames), state


__all__ = ["TemporalAttention", "TemporalTokenMerging"]
