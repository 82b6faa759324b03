"""Token merging inside transformers vision towers (CLIP, SigLIP, ViT, DINOv2), no monkey-patching.

`TokenMergingVisionTower` holds the vision model itself and runs its own embeddings, layers and
final norm; only the loop over the layers is ours (`run_token_merging`), so each block's
attention and MLP are called through a small per-family adapter that uses the layer's own
submodules and weights. At r = 0 the output equals the plain model's `last_hidden_state`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from transformers import CLIPModel, CLIPVisionModel, Dinov2Model, SiglipModel, SiglipVisionModel, ViTModel

from .token_merging import (
    BlockAdapter,
    BlockHook,
    TokenMergingConfig,
    TokenMergingOutput,
    _as_config,
    attention_backend,
    check_attention_backend,
    run_token_merging,
    self_attention,
    text_relevance,
)

__all__ = [
    "CLIPLayerAdapter",
    "ViTLayerAdapter",
    "Dinov2LayerAdapter",
    "SUPPORTED_VISION_MODELS",
    "TokenMergingVisionTower",
]


# ----------------------------------------------------------------------------- per-family adapters


class CLIPLayerAdapter:
    """`CLIPEncoderLayer` and `SiglipEncoderLayer` (pre-LN: layer_norm1, self_attn, layer_norm2, mlp)."""

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def attention(self, layer: nn.Module, hidden: Tensor, attn_bias: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        attn = layer.self_attn
        dropout_p = attn.dropout if attn.training else 0.0
        context, keys, weights = self_attention(
            layer.layer_norm1(hidden), attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.num_heads, attn.scale,
            dropout_p, attn_bias,
        )
        return hidden + attn.out_proj(context), keys, weights

    def mlp(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return hidden + layer.mlp(layer.layer_norm2(hidden))


class ViTLayerAdapter:
    """`ViTLayer` (pre-LN with hidden dropout after each sub-block)."""

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.attention

    def attention(self, layer: nn.Module, hidden: Tensor, attn_bias: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        attn = layer.attention
        dropout_p = attn.attention_dropout if attn.training else 0.0
        context, keys, weights = self_attention(
            layer.layernorm_before(hidden), attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.num_attention_heads,
            attn.scaling, dropout_p, attn_bias,
        )
        return hidden + layer.dropout(attn.o_proj(context)), keys, weights

    def mlp(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return hidden + layer.dropout(layer.mlp(layer.layernorm_after(hidden)))


class Dinov2LayerAdapter:
    """`Dinov2Layer` (pre-LN with layer scale and drop path; MLP or SwiGLU FFN)."""

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.attention

    def attention(self, layer: nn.Module, hidden: Tensor, attn_bias: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
        attn = layer.attention
        dropout_p = attn.attention_dropout if attn.training else 0.0
        context, keys, weights = self_attention(
            layer.norm1(hidden), attn, attn.q_proj, attn.k_proj, attn.v_proj, attn.num_attention_heads, attn.scaling,
            dropout_p, attn_bias,
        )
        return hidden + layer.drop_path(layer.layer_scale1(attn.o_proj(context))), keys, weights

    def mlp(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return hidden + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(hidden))))


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class _VisionFamily:
    """How to reach one model class's embeddings, layers and final norm."""

    adapter: BlockAdapter
    layers: Callable[[nn.Module], nn.ModuleList]
    embed: Callable[[nn.Module, Tensor, bool], Tensor]
    final_norm: Callable[[nn.Module, Tensor], Tensor]
    prefix_tokens: int  # leading non-patch tokens (CLS)


def _clip_embed(m: nn.Module, pixels: Tensor, interpolate: bool) -> Tensor:
    return m.pre_layrnorm(m.embeddings(pixels, interpolate_pos_encoding=interpolate))


def _vit_embed(m: nn.Module, pixels: Tensor, interpolate: bool) -> Tensor:
    return m.embeddings(pixels, interpolate_pos_encoding=interpolate)


_FAMILIES: dict[type, _VisionFamily] = {
    # CLIPVisionModel's last_hidden_state has no final norm (post_layernorm only feeds the pooler)
    CLIPVisionModel: _VisionFamily(CLIPLayerAdapter(), lambda m: m.encoder.layers, _clip_embed, lambda m, h: h, 1),
    SiglipVisionModel: _VisionFamily(
        CLIPLayerAdapter(), lambda m: m.encoder.layers, _vit_embed, lambda m, h: m.post_layernorm(h), 0
    ),
    ViTModel: _VisionFamily(ViTLayerAdapter(), lambda m: m.layers, _vit_embed, lambda m, h: m.layernorm(h), 1),
    Dinov2Model: _VisionFamily(
        Dinov2LayerAdapter(), lambda m: m.encoder.layer, lambda m, p, _: m.embeddings(p), lambda m, h: m.layernorm(h), 1
    ),
}
SUPPORTED_VISION_MODELS: tuple[str, ...] = tuple(cls.__name__ for cls in _FAMILIES) + (
    "CLIPModel (its .vision_model)",
    "SiglipModel (its .vision_model)",
)


def _resolve(vision_model: nn.Module) -> tuple[nn.Module, _VisionFamily]:
    if isinstance(vision_model, (CLIPModel, SiglipModel)):
        vision_model = vision_model.vision_model
    for cls, family in _FAMILIES.items():
        if type(vision_model) is cls:
            return vision_model, family
    raise TypeError(
        f"TokenMergingVisionTower supports {', '.join(SUPPORTED_VISION_MODELS)}; got {type(vision_model).__name__}"
    )


# ----------------------------------------------------------------------------- the tower


class TokenMergingVisionTower(nn.Module):
    """A transformers vision model run with token merging between each block's attention and MLP.

    Holds the model itself (`self.vision_model`, no copies); `merging=None` means r = 0 with the
    family's own prefix count protected (CLS, or none for SigLIP). With an explicit config,
    `protected` is taken as given (set protected=0 for SigLIP, which has no CLS token).
    """

    def __init__(self, vision_model: nn.Module, merging: TokenMergingConfig | dict | None = None) -> None:
        super().__init__()
        self.vision_model, self._family = _resolve(vision_model)
        if merging is None:
            merging = TokenMergingConfig(r=0, protected=self._family.prefix_tokens)
        self.merging = _as_config(merging)
        self.merging.schedule(self.num_layers)  # validate a per-layer list early
        check_attention_backend(self.backend, self.merging, where="TokenMergingVisionTower")

    @property
    def backend(self) -> str:
        """The attention implementation the vision model's config names (`set_attn_implementation` changes it)."""
        return attention_backend(self._family.adapter.attention_module(self.layers[0]))

    @property
    def config(self):
        return self.vision_model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self._family.layers(self.vision_model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def num_tokens(self, image_size: int | tuple[int, int] | None = None) -> int:
        """Input sequence length (prefix + patches) for `image_size` (default: the config's)."""
        size = self.config.image_size if image_size is None else image_size
        h, w = (size, size) if isinstance(size, int) else size
        p = self.config.patch_size
        p_h, p_w = (p, p) if isinstance(p, int) else p
        return self._family.prefix_tokens + (h // p_h) * (w // p_w)

    def output_tokens(self, image_size: int | tuple[int, int] | None = None) -> int:
        """Tokens out of the tower: deterministic, so a processor can expand image placeholders to it."""
        return self.token_counts(image_size)[-1]

    def token_counts(self, image_size: int | tuple[int, int] | None = None) -> list[int]:
        return self.merging.token_counts(self.num_tokens(image_size), self.num_layers)

    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """The embedded tokens (B, N, C) before the first block (prefix + patches): what relevance scores read."""
        model = self.vision_model
        return self._family.embed(model, pixel_values.to(model.dtype), interpolate_pos_encoding)

    def forward(
        self,
        pixel_values: Tensor,
        hooks: Sequence[BlockHook] = (),
        track_sources: bool = False,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        relevance: Tensor | None = None,
        text_embeds: Tensor | None = None,
    ) -> TokenMergingOutput:
        """hidden_states: the embeddings, then each layer's output (before the final norm, as transformers'
        towers); attentions (eager only): each layer's probabilities over its own, shrinking, token count.

        Text-guided merging (`merging.protect_relevant` > 0) reads `relevance` (B, N), one score per input
        token (e.g. a patch detector's), or computes it from `text_embeds` (B, C) in the tower's width as
        the cosine with each embedded token; with neither, merging is plain ToMe (the captioning fallback)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():  # raw 0-255 bytes would run, silently wrong
            raise ValueError(
                f"TokenMergingVisionTower: pixel_values must be floats normalised by the image processor, got "
                f"dtype {pixel_values.dtype} (value range {int(pixel_values.min())}..{int(pixel_values.max())}); "
                "run the model's processor on the images"
            )
        check_attention_backend(self.backend, self.merging, where="TokenMergingVisionTower")
        model, family = self.vision_model, self._family
        hidden = self.embed(pixel_values, interpolate_pos_encoding)  # (B, N, C)
        if text_embeds is not None:
            if relevance is not None:
                raise ValueError("TokenMergingVisionTower: give relevance or text_embeds, not both")
            relevance = text_relevance(hidden, text_embeds)  # (B, N)
        out = run_token_merging(
            self.layers,
            family.adapter,
            self.merging,
            hidden,
            hooks=hooks,
            track_sources=track_sources,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            relevance=relevance,
        )
        out.last_hidden_state = family.final_norm(model, out.last_hidden_state)
        return out
