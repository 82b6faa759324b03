"""Token merging (ToMe, Bolya et al. 2023) for any transformer block loop, SDPA-compatible.

A block is split at its seam: the attention sub-block runs, the r most similar token pairs are
merged (bipartite soft matching on the attention keys averaged over heads), then the MLP
sub-block runs on fewer tokens. Merged tokens carry a size; proportional attention adds log(size)
to the attention logits as an additive bias on the key axis.

Attention goes through transformers' attention interface for the layer's own config
(`config._attn_implementation`): "eager" (ours, returns the probabilities, so `output_attentions`
works through merged layers), "sdpa" (the default; the bias is SDPA's float mask, fused kernels keep
working), "flex_attention" (no bias: transformers' flex entry point; with a bias: torch's compiled
`flex_attention` with a score modification that adds the (B, N) key bias, never an (N, N) mask —
transformers' flex wrapper reads a tensor mask per (b, q, kv) and crashed the CPU kernel in torch
2.13, `malloc(): unaligned tcache chunk`), "flash_attention_*" (only when no bias is needed:
`check_attention_backend` says so at construction time).

The per-family `BlockAdapter`s run the layer's own submodules (no monkey-patching, no weight
copies). `run_token_merging` is the block loop; `TokenMergingEncoder` is the same loop as an
nn.Module that owns its layers (the MergeBridge bridge). Hooks (`BlockHook`) can act after
attention or after each block (text-aware pruning, temporal merging). When the owning model has
gradient checkpointing enabled (transformers sets `layer.gradient_checkpointing`), each whole block
(attention, hooks, merge, MLP) is checkpointed with the layer's own checkpointing function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

__all__ = [
    "MERGE_MODES",
    "UNMERGED_ORDERS",
    "TokenMergingConfig",
    "MergeState",
    "bipartite_soft_matching",
    "merge_tokens",
    "relevant_guard",
    "text_relevance",
    "padding_bias",
    "attention_backend",
    "check_attention_backend",
    "eager_attention",
    "flex_key_bias_attention",
    "self_attention",
    "BlockAdapter",
    "BertLayerAdapter",
    "BlockHook",
    "TokenMergingOutput",
    "run_token_merging",
    "TokenMergingEncoder",
    "analytic_macs",
]

MERGE_MODES = ("size_weighted", "mean")
UNMERGED_ORDERS = ("tome", "spatial")


# ----------------------------------------------------------------------------- config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TokenMergingConfig:
    """How many tokens to merge per block and how; serialises into any model config.

    r: an int (the same r in every block), `(r, -1)` (decreasing linearly from 2r in the first
    block to 0 in the last, as ToMe's "decreasing" schedule) or an explicit per-layer list.
    The r actually merged in a block is clipped to (N - protected) // 2.
    mode: "size_weighted" (ToMe: size-weighted average, proportional attention) or "mean"
    (EVLGen: plain mean; sizes are still counted but never weight anything).
    protected: leading tokens that never merge (1 = CLS; 0 for SigLIP, which has no CLS).
    unmerged_order: where the A tokens that were not merged go. "tome" (default) is the official ToMe
    code: re-sorted into position order only when a token is protected (its CLS fix-up), otherwise left
    in descending order of their best match score, which decides the next block's A/B split. "spatial"
    always re-sorts them (leanvlp before 0.2; identical to "tome" whenever protected > 0).
    protect_relevant: text-guided merging (0 = off). Given per-token relevance scores (e.g. similarity to
    the question), in every block up to this many tokens whose relevance is above their image's mean
    neither merge nor absorb another token; the rest merge as usual, so the token count per block is the
    same as without guidance. See `bipartite_soft_matching` for the rule.
    """

    r: int | tuple[int, int] | list[int] = 0
    mode: str = "size_weighted"
    prop_attn: bool = True
    protected: int = 1
    unmerged_order: str = "tome"
    protect_relevant: int = 0

    def __post_init__(self) -> None:
        r = self.r
        if isinstance(r, (list, tuple)) and len(r) == 2 and _is_int(r[1]) and r[1] == -1:
            r = (r[0], -1)  # a JSON round-trip turns the (r, -1) tuple into a list
        if isinstance(r, tuple):
            if len(r) != 2 or r[1] != -1:
                raise ValueError(f"TokenMergingConfig.r: a tuple schedule must be (r, -1) (decreasing), got {r!r}")
            self._check_r_value(r[0], r)
        elif isinstance(r, list):
            for value in r:
                self._check_r_value(value, r)
            r = [int(v) for v in r]
        else:
            self._check_r_value(r, r)
        self.r = r
        if self.mode not in MERGE_MODES:
            raise ValueError(f"TokenMergingConfig.mode must be one of {MERGE_MODES}, got {self.mode!r}")
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"TokenMergingConfig.prop_attn must be a bool, got {self.prop_attn!r}")
        if not _is_int(self.protected) or self.protected < 0:
            raise ValueError(f"TokenMergingConfig.protected must be an int >= 0, got {self.protected!r}")
        if not _is_int(self.protect_relevant) or self.protect_relevant < 0:
            raise ValueError(
                f"TokenMergingConfig.protect_relevant must be an int >= 0, got {self.protect_relevant!r}"
            )
        if self.unmerged_order not in UNMERGED_ORDERS:
            raise ValueError(
                f"TokenMergingConfig.unmerged_order must be one of {UNMERGED_ORDERS}, got {self.unmerged_order!r}"
            )

    @staticmethod
    def _check_r_value(value: Any, whole: Any) -> None:
        if not _is_int(value) or value < 0:
            raise ValueError(f"TokenMergingConfig.r: every r must be an int >= 0, got {value!r} in r={whole!r}")

    @property
    def use_prop_attn(self) -> bool:
        """Proportional attention only makes sense with size-weighted merging."""
        return self.prop_attn and self.mode == "size_weighted"

    def to_dict(self) -> dict[str, Any]:
        r = list(self.r) if isinstance(self.r, (tuple, list)) else self.r
        return {"r": r, "mode": self.mode, "prop_attn": self.prop_attn, "protected": self.protected,
                "unmerged_order": self.unmerged_order, "protect_relevant": self.protect_relevant}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenMergingConfig:
        unknown = set(d) - {"r", "mode", "prop_attn", "protected", "unmerged_order", "protect_relevant"}
        if unknown:
            raise ValueError(f"TokenMergingConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)

    def schedule(self, num_layers: int) -> list[int]:
        """Requested r per layer (before clipping to what the token count allows)."""
        if not _is_int(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if isinstance(self.r, tuple):
            r = self.r[0]
            if num_layers == 1:
                return [r]
            # 2r in the first layer down to 0 in the last, floored (exact integer arithmetic)
            return [(2 * r * (num_layers - 1 - i)) // (num_layers - 1) for i in range(num_layers)]
        if isinstance(self.r, list):
            if len(self.r) != num_layers:
                raise ValueError(
                    f"TokenMergingConfig.r: the per-layer list has {len(self.r)} entries but the model has "
                    f"{num_layers} layers (r={self.r!r})"
                )
            return list(self.r)
        return [self.r] * num_layers

    def max_protect_relevant(self, num_tokens: int, num_layers: int) -> int:
        """The most tokens text-guided merging can guard in every block while each still merges its r:
        per merging block, Na - r (guarded A tokens cannot merge) and Nb - 1 (one B token must take them)."""
        bound, n = num_tokens, num_tokens
        for r in self.schedule(num_layers):
            r = min(r, (n - self.protected) // 2)
            if r > 0:
                num_a, num_b = _split_sizes(n, self.protected)
                bound = min(bound, num_a - r, num_b - 1)
            n -= r
        return bound

    def check_protect_relevant(self, num_tokens: int, num_layers: int) -> None:
        """Fail early when `protect_relevant` exceeds what the schedule leaves for `num_tokens` input tokens."""
        bound = self.max_protect_relevant(num_tokens, num_layers)
        if self.protect_relevant > bound:
            raise ValueError(
                f"TokenMergingConfig.protect_relevant={self.protect_relevant} is more than r={self.r!r} leaves for "
                f"{num_tokens} tokens over {num_layers} layers: at most {bound} tokens can stay out of every "
                "block's matching while it still merges r"
            )

    def token_counts(self, num_tokens: int, num_layers: int) -> list[int]:
        """Token count after each layer for an input of `num_tokens` (clipped like the forward)."""
        if not _is_int(num_tokens) or num_tokens < self.protected:
            raise ValueError(f"num_tokens must be an int >= protected ({self.protected}), got {num_tokens!r}")
        counts, n = [], num_tokens
        for r in self.schedule(num_layers):
            n -= min(r, (n - self.protected) // 2)
            counts.append(n)
        return counts


# ----------------------------------------------------------------------------- matching and merging


@dataclass
class MergeState:
    """What travels through the block loop besides the hidden states."""

    sizes: Tensor | None = None  # (B, N, 1) float32, original tokens held by each token
    sources: Tensor | None = None  # (B, N, N0) float32 0/1, which original tokens each token holds
    relevance: Tensor | None = None  # (B, N) float32, text relevance per token (text-guided merging only)

    def attention_bias(self, prop_attn: bool) -> Tensor | None:
        """Proportional attention as an additive mask: log(size) on the key axis, (B, 1, 1, N)."""
        if not prop_attn or self.sizes is None:
            return None
        return self.sizes.log().transpose(1, 2).unsqueeze(1)


def _split_sizes(n: int, protected: int) -> tuple[int, int]:
    """(Na, Nb): how many of n tokens fall in set A (even positions) and B (odd) after `protected`."""
    a_start, b_start = protected + protected % 2, protected + 1 - protected % 2
    return (n - a_start + 1) // 2, (n - b_start + 1) // 2


def relevant_guard(relevance: Tensor, protected: int, k: int, a_start: int, b_start: int) -> tuple[Tensor, Tensor]:
    """Which A and B tokens text-guided merging keeps out of this block's matching: (B, Na), (B, Nb) bool.

    Candidates are the non-protected tokens whose relevance is strictly above their image's mean (an image
    whose relevance is all equal has none, so its matching is plain ToMe); the k most relevant candidates
    are guarded. `TokenMergingConfig.max_protect_relevant` bounds k so that r tokens can always merge.
    """
    rel = relevance[:, protected:].float()  # (B, N - protected)
    candidate = (rel > rel.mean(dim=1, keepdim=True)) & (rel.amax(dim=1, keepdim=True) > rel.amin(dim=1, keepdim=True))
    rank = rel.masked_fill(~candidate, float("-inf")).argsort(dim=1, descending=True).argsort(dim=1)  # 0 = top
    guard = torch.zeros_like(relevance, dtype=torch.bool)
    guard[:, protected:] = candidate & (rank < k)
    return guard[:, a_start::2], guard[:, b_start::2]


def bipartite_soft_matching(
    metric: Tensor, r: int, protected: int, unmerged_order: str = "tome",
    relevance: Tensor | None = None, protect_relevant: int = 0,
) -> tuple[Callable[[Tensor, str], Tensor], Callable[[Tensor], Tensor]]:
    """Match r tokens of set A into set B by cosine similarity of `metric` (B, N, D).

    The first `protected` tokens take no part (equivalent to ToMe's -inf score rows, but they
    all stay in front in their order, so a distillation token stays at index 1). Among the rest,
    A = even positions and B = odd positions; each A token picks its most similar B token and the
    r A tokens with the highest such scores merge into their partners. Returns `merge(x, reduce)`
    mapping (B, N, C) -> (B, N - r, C) in the order [protected, unmerged A, B], with reduce "sum" or
    "mean", and `unmerge(y)` mapping merged tokens back to (B, N, C). Unmerged A tokens are in position
    order when `unmerged_order="spatial"` or any token is protected, else in descending score order
    (`"tome"`, the official code's order; see `TokenMergingConfig.unmerged_order`).
    Text-guided merging (`relevance` (B, N) and `protect_relevant` > 0): the tokens `relevant_guard`
    picks get -inf match scores as A rows and as B columns, so they neither merge nor absorb a token.
    """
    B, N, _ = metric.shape
    if not _is_int(protected) or not 0 <= protected <= N:
        raise ValueError(f"protected must be an int in [0, N={N}], got {protected!r}")
    if not _is_int(r) or r < 0:
        raise ValueError(f"r must be an int >= 0, got {r!r}")
    if unmerged_order not in UNMERGED_ORDERS:
        raise ValueError(f"unmerged_order must be one of {UNMERGED_ORDERS}, got {unmerged_order!r}")
    r = min(r, (N - protected) // 2)
    a_start = protected + protected % 2  # first even position >= protected
    b_start = protected + 1 - protected % 2  # first odd position >= protected
    with torch.no_grad():
        metric = F.normalize(metric, dim=-1)  # cosine similarity (zero keys give zeros, not NaN)
        scores = metric[:, a_start::2] @ metric[:, b_start::2].transpose(1, 2)  # (B, Na, Nb)
        if relevance is not None and protect_relevant > 0 and r > 0:
            guard_a, guard_b = relevant_guard(relevance, protected, protect_relevant, a_start, b_start)
            if int(guard_a.sum(1).max()) > guard_a.shape[1] - r or int(guard_b.sum(1).max()) > guard_b.shape[1] - 1:
                raise ValueError(f"text-guided merging: protect_relevant={protect_relevant} leaves fewer than r={r} "
                                 f"mergeable tokens among {N} (a hook shrank the sequence?)")
            scores = scores.masked_fill(guard_a[:, :, None] | guard_b[:, None, :], float("-inf"))
        best, partner = scores.max(dim=-1)  # (B, Na)
        order = best.argsort(dim=-1, descending=True)
        src_idx = order[:, :r, None]  # (B, r, 1) merged A tokens
        unm_idx = order[:, r:]  # (B, Na - r) kept A tokens, best score first
        if unmerged_order == "spatial" or protected > 0:
            unm_idx = unm_idx.sort(dim=-1).values
        unm_idx = unm_idx[..., None]  # (B, Na - r, 1)
        dst_idx = partner[..., None].gather(1, src_idx)  # (B, r, 1) their B partners
    num_a = (N - a_start + 1) // 2

    def merge(x: Tensor, reduce: str = "sum") -> Tensor:
        C = x.shape[-1]
        a, b = x[:, a_start::2], x[:, b_start::2]
        unm = a.gather(1, unm_idx.expand(B, num_a - r, C))
        src = a.gather(1, src_idx.expand(B, r, C))
        b = b.scatter_reduce(1, dst_idx.expand(B, r, C), src, reduce=reduce)
        return torch.cat([x[:, :protected], unm, b], dim=1)

    def unmerge(y: Tensor) -> Tensor:
        C = y.shape[-1]
        n_unm = num_a - r
        unm, b = y[:, protected : protected + n_unm], y[:, protected + n_unm :]
        out = y.new_empty(B, N, C)
        out[:, :protected] = y[:, :protected]
        out[:, b_start::2] = b
        a = out[:, a_start::2]  # a view into out
        a.scatter_(1, unm_idx.expand(B, n_unm, C), unm)
        a.scatter_(1, src_idx.expand(B, r, C), b.gather(1, dst_idx.expand(B, r, C)))
        return out

    return merge, unmerge


def merge_tokens(
    x: Tensor, metric: Tensor, r: int, state: MergeState, mode: str = "size_weighted", protected: int = 1,
    unmerged_order: str = "tome", protect_relevant: int = 0,
) -> tuple[Tensor, MergeState]:
    """Merge r tokens of x (B, N, C) -> (B, N - r', C), r' = min(r, (N - protected) // 2).

    With `state.relevance` and `protect_relevant` > 0 the matching is text-guided; a merged token's
    relevance is the largest of its parts."""
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric {tuple(metric.shape)} and x {tuple(x.shape)} disagree on (B, N)")
    merge, _ = bipartite_soft_matching(metric, r, protected, unmerged_order, state.relevance, protect_relevant)
    sizes = state.sizes if state.sizes is not None else x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
    if mode == "size_weighted":
        x = merge(x * sizes.to(x.dtype), "sum")
        sizes = merge(sizes, "sum")
        x = x / sizes.to(x.dtype)
    else:
        x = merge(x, "mean")
        sizes = merge(sizes, "sum")
    sources = merge(state.sources, "sum") if state.sources is not None else None
    relevance = merge(state.relevance[..., None], "amax")[..., 0] if state.relevance is not None else None
    return x, MergeState(sizes=sizes, sources=sources, relevance=relevance)


def text_relevance(tokens: Tensor, text_embeds: Tensor) -> Tensor:
    """Parameter-free relevance for text-guided merging: cosine of each token (B, N, C) with its text (B, C)."""
    if text_embeds.shape != (tokens.shape[0], tokens.shape[-1]):
        raise ValueError(f"text_embeds must be (B, C) = {(tokens.shape[0], tokens.shape[-1])} (the tokens' width), "
                         f"got shape {tuple(text_embeds.shape)}")
    return F.cosine_similarity(tokens.float(), text_embeds.float()[:, None, :], dim=-1)  # (B, N)


def padding_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A (B, N) 1/0 padding mask -> the additive (B, 1, 1, N) bias the block loop takes."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, N), got shape {tuple(attention_mask.shape)}")
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


# ----------------------------------------------------------------------------- attention and adapters


def attention_backend(module: nn.Module) -> str:
    """The attention implementation a layer's own config asks for ("sdpa" when it names none)."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None) or "sdpa"


def check_attention_backend(backend: str, merging: TokenMergingConfig, padded: bool = False,
                            where: str = "token merging") -> None:
    """Flash kernels take no additive bias: refuse a setting that needs one (proportional attention, padding)."""
    if not backend.startswith("flash_attention"):
        return
    if merging.use_prop_attn:
        raise ValueError(
            f"{where}: attn_implementation={backend!r} cannot add proportional attention's log(size) bias; set "
            f"merging mode='mean' or prop_attn=False (now mode={merging.mode!r}, prop_attn={merging.prop_attn}), "
            "or use 'sdpa' / 'flex_attention'"
        )
    if padded:
        raise ValueError(f"{where}: attn_implementation={backend!r} cannot take a padding bias; use 'sdpa' or "
                         "'flex_attention' for padded inputs")


def eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    scaling: float, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scaling + mask) v, as transformers' per-model eager functions: ((B, N, h, d), (B, h, N, N))."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, h, N, N)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def self_attention(
    hidden: Tensor,
    module: nn.Module,
    q_proj: nn.Module,
    k_proj: nn.Module,
    v_proj: nn.Module,
    num_heads: int,
    scale: float,
    dropout_p: float,
    attn_bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Self-attention with the given projections through `module`'s configured backend.

    Returns (context (B, N, h*d), keys mean over heads (B, N, d), probabilities (B, h, N, N) or None:
    only eager computes them).
    """
    B, N, _ = hidden.shape
    q = q_proj(hidden).view(B, N, num_heads, -1).transpose(1, 2)  # (B, h, N, d)
    k = k_proj(hidden).view(B, N, num_heads, -1).transpose(1, 2)
    v = v_proj(hidden).view(B, N, num_heads, -1).transpose(1, 2)
    backend = attention_backend(module)
    if attn_bias is not None:
        if backend.startswith("flash_attention"):
            raise ValueError(f"attn_implementation={backend!r} cannot take the additive attention bias this "
                             "block needs (proportional attention or padding); use 'sdpa' or 'flex_attention'")
        attn_bias = attn_bias.to(q.dtype)
    if backend == "flex_attention" and attn_bias is not None:
        attend = flex_key_bias_attention
    elif backend == "eager":
        attend = eager_attention
    else:
        attend = ALL_ATTENTION_FUNCTIONS[backend]
    out, weights = attend(module, q, k, v, attn_bias, dropout=dropout_p, scaling=scale, is_causal=False)
    return out.reshape(B, N, -1), k.detach().mean(dim=1), weights


_compiled_flex: Callable[..., Tensor] | None = None


def flex_key_bias_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
                            scaling: float, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """torch's flex_attention with a key-axis bias (B, 1, 1, N) added as a score modification."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if dropout > 0:
        raise ValueError("flex_attention does not support attention dropout; call model.eval() or set the "
                         "attention dropout of the config to 0")
    B, _, _, N = attention_mask.shape
    if attention_mask.shape != (B, 1, 1, N):
        raise ValueError(f"flex_attention: the bias must be on the key axis only, (B, 1, 1, N), got "
                         f"{tuple(attention_mask.shape)}")
    bias = attention_mask.view(B, N)

    def add_key_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + bias[b, kv_idx]

    if _compiled_flex is None:  # compiled once: flex's eager path is a slow reference implementation
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    out = _compiled_flex(query, key, value, score_mod=add_key_bias, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


class BlockAdapter(Protocol):
    """Runs one layer family's two sub-blocks with the layer's own submodules."""

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The layer's attention module: its `config` names the attention backend."""
        ...

    def attention(self, layer: nn.Module, hidden: Tensor, attn_bias: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Norm, q/k/v, attention (+ attn_bias), out proj, residual -> (hidden (B, N, C), keys mean over heads,
        attention probabilities (B, h, N, N) or None)."""
        ...

    def mlp(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        """Norm, MLP, residual -> hidden (B, N, C)."""
        ...


class BertLayerAdapter:
    """transformers' `BertLayer` (post-LN, encoder self-attention only), e.g. the MergeBridge bridge."""

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.attention.self

    def attention(self, layer: nn.Module, hidden: Tensor, attn_bias: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        if getattr(layer, "is_decoder", False):
            raise TypeError("BertLayerAdapter supports encoder (bidirectional) BertLayers only, got a decoder layer")
        attn = self.attention_module(layer)
        dropout_p = attn.dropout.p if attn.training else 0.0
        context, keys, weights = self_attention(
            hidden, attn, attn.query, attn.key, attn.value, attn.num_attention_heads, attn.scaling, dropout_p,
            attn_bias,
        )
        return layer.attention.output(context, hidden), keys, weights  # dense, dropout, LayerNorm(+ residual)

    def mlp(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return layer.output(layer.intermediate(hidden), hidden)  # dense, act, dense, dropout, LayerNorm(+ residual)


# ----------------------------------------------------------------------------- block loop


class BlockHook:
    """Per-block extension point; both methods are identity by default.

    A hook that changes the token count (pruning, fusing) must do it in `after_block` and keep
    `state.sizes` / `state.sources` consistent (each output token's sizes = its sources' row sum).
    """

    def after_attention(self, layer_idx: int, hidden: Tensor, state: MergeState) -> tuple[Tensor, MergeState]:
        return hidden, state

    def after_block(self, layer_idx: int, hidden: Tensor, state: MergeState) -> tuple[Tensor, MergeState]:
        return hidden, state


@dataclass
class TokenMergingOutput(ModelOutput):
    """Output of the merging block loop (and of `TokenMergingVisionTower`).

    hidden_states: the input, then each layer's output, when asked; attentions: each layer's attention
    probabilities (B, h, N_i, N_i) under eager attention, when asked. N_i shrinks layer by layer: entry i
    has the token count layer i attended over (the count before its merge).
    """

    last_hidden_state: Tensor | None = None  # (B, N', C)
    sizes: Tensor | None = None  # (B, N', 1)
    sources: Tensor | None = None  # (B, N', N0), only when tracked
    token_counts: list[int] | None = None  # after each layer
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


def _block(
    layer: nn.Module,
    adapter: BlockAdapter,
    merging: TokenMergingConfig,
    layer_idx: int,
    r: int,
    hooks: Sequence[BlockHook],
    n_in: int,
    hidden: Tensor,
    sizes: Tensor,
    sources: Tensor | None,
    attn_bias: Tensor | None,
    relevance: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One layer: attention -> hooks.after_attention -> merge r -> MLP -> hooks.after_block (tensors in and out,
    so the whole block can run under activation checkpointing)."""
    state = MergeState(sizes=sizes, sources=sources, relevance=relevance)
    bias = attn_bias if hidden.shape[1] == n_in else None
    if hidden.shape[1] < n_in:
        prop = state.attention_bias(merging.use_prop_attn)
        if prop is not None:
            bias = prop
    hidden, keys, weights = adapter.attention(layer, hidden, bias)
    for hook in hooks:
        hidden, state = hook.after_attention(layer_idx, hidden, state)
    r = min(r, (hidden.shape[1] - merging.protected) // 2)
    if r > 0:
        if keys.shape[1] != hidden.shape[1]:
            raise ValueError(
                f"layer {layer_idx}: a hook changed the token count after attention ({keys.shape[1]} -> "
                f"{hidden.shape[1]}); change it in after_block instead"
            )
        hidden, state = merge_tokens(hidden, keys, r, state, merging.mode, merging.protected, merging.unmerged_order,
                                     merging.protect_relevant)
    hidden = adapter.mlp(layer, hidden)
    for hook in hooks:
        hidden, state = hook.after_block(layer_idx, hidden, state)
    if relevance is not None and (state.relevance is None or state.relevance.shape[1] != hidden.shape[1]):
        raise ValueError(
            f"layer {layer_idx}: a hook changed the token count to {hidden.shape[1]} without carrying "
            "MergeState.relevance along; text-guided merging (protect_relevant) cannot follow it"
        )
    return hidden, state.sizes, state.sources, weights, state.relevance


def run_token_merging(
    layers: Sequence[nn.Module],
    adapter: BlockAdapter,
    merging: TokenMergingConfig,
    hidden: Tensor,
    attn_bias: Tensor | None = None,
    hooks: Sequence[BlockHook] = (),
    track_sources: bool = False,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    relevance: Tensor | None = None,
) -> TokenMergingOutput:
    """The block loop: per layer, attention -> hooks.after_attention -> merge r_i -> MLP -> hooks.after_block.

    `relevance` (B, N) steers the matching when `merging.protect_relevant` > 0 (text-guided merging).

    `attn_bias` (additive, broadcastable to (B, h, N, N), e.g. `padding_bias(mask)`) is used while
    the token count is unchanged and dropped once it changes (merged tokens are all real tokens).
    Proportional attention is added only once some token holds more than one original token.
    A layer whose `gradient_checkpointing` transformers has switched on runs its whole block checkpointed
    while training.
    """
    B, n_in, _ = hidden.shape
    schedule = merging.schedule(len(layers))
    if merging.protected > n_in:
        raise ValueError(f"TokenMergingConfig.protected={merging.protected} exceeds the {n_in} input tokens")
    if relevance is not None and merging.protect_relevant > 0:
        merging.check_protect_relevant(n_in, len(layers))
    sources = None
    if track_sources:
        sources = torch.eye(n_in, device=hidden.device, dtype=torch.float32).expand(B, n_in, n_in)
    sizes = hidden.new_ones(B, n_in, 1, dtype=torch.float32)
    if relevance is not None:
        if relevance.shape != (B, n_in):
            raise ValueError(f"relevance must be (B, N) = {(B, n_in)} (one score per input token), got "
                             f"shape {tuple(relevance.shape)}")
        relevance = relevance.detach().float()
    counts: list[int] = []
    all_hidden = [hidden] if output_hidden_states else None
    all_attentions: list[Tensor] | None = [] if output_attentions else None
    for i, (layer, r) in enumerate(zip(layers, schedule)):
        block = partial(_block, layer, adapter, merging, i, r, hooks, n_in)
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            hidden, sizes, sources, weights, relevance = layer._gradient_checkpointing_func(
                block, hidden, sizes, sources, attn_bias, relevance)
        else:
            hidden, sizes, sources, weights, relevance = block(hidden, sizes, sources, attn_bias, relevance)
        counts.append(hidden.shape[1])
        if all_hidden is not None:
            all_hidden.append(hidden)
        if all_attentions is not None:
            if weights is None:
                logger.warning_once(f"{attention_backend(adapter.attention_module(layer))} attention returns no "
                                    "attention maps: set attn_implementation='eager' for output_attentions=True")
            else:
                all_attentions.append(weights)
    return TokenMergingOutput(
        last_hidden_state=hidden,
        sizes=sizes,
        sources=sources,
        token_counts=counts,
        hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        attentions=tuple(all_attentions) if all_attentions is not None else None,
    )


class TokenMergingEncoder(nn.Module):
    """An encoder that owns `layers` and runs them with token merging (e.g. BERT layers of a bridge).

    The layers are registered here (`encoder.layers`): do not register the same ModuleList a
    second time elsewhere in a model, or its state dict gets duplicate keys. To run layers that a
    model already owns (a vision tower), call `run_token_merging` directly.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        adapter: BlockAdapter,
        merging: TokenMergingConfig | dict | None = None,
        hooks: Sequence[BlockHook] = (),
    ) -> None:
        super().__init__()
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"layers must be an nn.ModuleList, got {type(layers).__name__}")
        self.layers = layers
        self.adapter = adapter
        self.merging = _as_config(merging)
        self.hooks = tuple(hooks)
        self.merging.schedule(len(layers))  # validate a per-layer list early
        self.check_backend()

    def check_backend(self, padded: bool = False) -> None:
        """A clear error now, rather than in a kernel, if the layers' attention backend cannot run this merging."""
        check_attention_backend(self.backend, self.merging, padded, "TokenMergingEncoder")

    @property
    def backend(self) -> str:
        """The attention implementation the layers' config names (they share one config)."""
        return attention_backend(self.adapter.attention_module(self.layers[0]))

    def forward(
        self,
        hidden: Tensor,
        attn_bias: Tensor | None = None,
        hooks: Sequence[BlockHook] = (),
        track_sources: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        relevance: Tensor | None = None,
    ) -> TokenMergingOutput:
        return run_token_merging(
            self.layers,
            self.adapter,
            self.merging,
            hidden,
            attn_bias=attn_bias,
            hooks=(*self.hooks, *hooks),
            track_sources=track_sources,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            relevance=relevance,
        )

    def token_counts(self, num_tokens: int) -> list[int]:
        return self.merging.token_counts(num_tokens, len(self.layers))


def _as_config(merging: TokenMergingConfig | dict | None) -> TokenMergingConfig:
    if merging is None:
        return TokenMergingConfig()
    if isinstance(merging, dict):
        return TokenMergingConfig.from_dict(merging)
    if isinstance(merging, TokenMergingConfig):
        return merging
    raise TypeError(f"merging must be a TokenMergingConfig, a dict or None, got {type(merging).__name__}")


def analytic_macs(num_tokens: int, hidden_size: int, counts_after: Sequence[int], mlp_ratio: float = 4.0) -> float:
    """MACs of a ViT block stack: attention 4NC^2 + 2N^2C on the pre-merge N, MLP 2*ratio*N'C^2 on post-merge N'."""
    C, n, total = hidden_size, num_tokens, 0.0
    for n_after in counts_after:
        total += 4 * n * C * C + 2 * n * n * C + 2 * mlp_ratio * n_after * C * C
        n = n_after
    return total
