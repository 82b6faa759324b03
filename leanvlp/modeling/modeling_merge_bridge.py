"""MergeBridge (SimVLG / EVLGen): frozen vision tower -> token-merging BERT bridge -> frozen causal LLM.

    pixels (B, 3, H, W) --vision tower--> (B, N0, Cv) --LayerNorm, Linear--> (B, N0, Cb) + positions
    --bridge: BERT layers, ToMe merge between attention and FFN--> (B, M, Cb) --Linear--> (B, M, Cl)
    --scattered into the M `<image>` positions of the prompt--> causal LLM --> next-token loss on targets

One stage, one loss. M is deterministic (N0 minus the merges of every layer), so the processor expands one
`<image>` into exactly M tokens. Videos (B, T, 3, H, W) run per frame, optionally with temporal token merging
inside the tower, and are averaged over frames before the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.bert.modeling_bert import BertLayer

from .configuration_merge_bridge import MergeBridgeConfig
from .temporal_merging import TemporalTokenMerging
from .token_merging import BertLayerAdapter, TokenMergingEncoder
from .transformers_compat import CACHE_NAME, get_cache, outputs_from
from .vision_tower import TokenMergingVisionTower


@dataclass
class MergeBridgeOutput(CausalLMOutputWithPast):
    """Output of [`MergeBridgeForConditionalGeneration`] (`loss` is the caption/answer LM loss).

    The LLM's fields (loss, logits, the cache under the installed release's name, hidden_states, attentions),
    then the visual prefix and the bridge's token counts.
    """

    image_hidden_states: Tensor | None = None  # (B, M, C_llm), the visual prefix
    bridge_token_counts: list[int] | None = None  # tokens after each bridge layer


@dataclass
class MergeBridgeModelOutput(BaseModelOutputWithPast):
    """Output of [`MergeBridgeModel`]: the LLM's last hidden state over the multimodal sequence (+ its cache)."""

    image_hidden_states: Tensor | None = None  # (B, M, C_llm)


class MergeBridgeBridge(nn.Module):
    """LayerNorm -> Linear -> learned positions -> BERT layers that merge tokens -> Linear into the LLM width.

    Parameter names follow BERT (`embeddings.*`, `encoder.layers.N.attention.self.query`...) so any BERT
    checkpoint's encoder initialises it (`load_bert`).
    """

    def __init__(self, config: MergeBridgeConfig) -> None:
        super().__init__()
        bc = config.bridge_config
        self.input_norm = nn.LayerNorm(config.vision_config.hidden_size)
        self.input_proj = nn.Linear(config.vision_config.hidden_size, bc.hidden_size)
        self.position_embeddings = nn.Embedding(config.num_bridge_input_tokens, bc.hidden_size)
        self.embed_norm = nn.LayerNorm(bc.hidden_size, eps=bc.layer_norm_eps)
        self.dropout = nn.Dropout(bc.hidden_dropout_prob)
        layers = nn.ModuleList(BertLayer(bc, layer_idx=i) for i in range(bc.num_hidden_layers))
        self.encoder = TokenMergingEncoder(layers, BertLayerAdapter(), config.bridge_merging)
        self.output_proj = nn.Linear(bc.hidden_size, config.text_config.hidden_size)

    def forward(self, vision_tokens: Tensor, track_sources: bool = False) -> tuple[Tensor, list[int]]:
        x = self.input_proj(self.input_norm(vision_tokens))  # (B, N0, Cb)
        if x.shape[1] != self.position_embeddings.num_embeddings:
            raise ValueError(
                f"MergeBridge: the vision tower gave {x.shape[1]} tokens but the bridge was configured for "
                f"{self.position_embeddings.num_embeddings} (vision_config.image_size / patch_size)"
            )
        x = self.dropout(self.embed_norm(x + self.position_embeddings.weight))
        out = self.encoder(x, track_sources=track_sources)  # (B, M, Cb)
        return self.output_proj(out.last_hidden_state), out.token_counts  # (B, M, C_llm)

    def load_bert(self, bert: PreTrainedModel) -> None:
        """Initialise positions, embedding LayerNorm and every layer from a BERT model's weights."""
        base = getattr(bert, "bert", bert)
        n = self.position_embeddings.num_embeddings
        if base.embeddings.position_embeddings.num_embeddings < n:
            raise ValueError(f"bridge_init: BERT has {base.embeddings.position_embeddings.num_embeddings} positions, need {n}")
        if len(base.encoder.layer) < len(self.encoder.layers):
            raise ValueError(f"bridge_init: BERT has {len(base.encoder.layer)} layers, the bridge {len(self.encoder.layers)}")
        with torch.no_grad():
            self.position_embeddings.weight.copy_(base.embeddings.position_embeddings.weight[:n])
        self.embed_norm.load_state_dict(base.embeddings.LayerNorm.state_dict())
        for ours, theirs in zip(self.encoder.layers, base.encoder.layer):
            ours.load_state_dict(theirs.state_dict())


class MergeBridgePreTrainedModel(PreTrainedModel):
    config_class = MergeBridgeConfig
    config: MergeBridgeConfig
    base_model_prefix = "merge_bridge"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True  # LLM decoder layers, and every block of the tower and the bridge
    _supports_sdpa = True
    _no_split_modules = ["BertLayer", "LlamaDecoderLayer", "OPTDecoderLayer", "CLIPEncoderLayer", "ViTLayer",
                         "Dinov2Layer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    accepts_loss_kwargs = False  # forward takes **kwargs; the loss is a per-batch mean, so Trainer must scale it

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.bridge_config.initializer_range
        if isinstance(module, MergeBridgeBridge):
            nn.init.normal_(module.position_embeddings.weight, std=std)
            for linear in (module.input_proj, module.output_proj):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
        elif isinstance(module, TemporalTokenMerging):
            for layer in module.layers:
                nn.init.zeros_(layer.gate)  # video starts as the frame-mean of image features
        else:
            super()._init_weights(module)

    def _build(self, config: MergeBridgeConfig, language_model: nn.Module) -> None:
        """The parts shared by both heads; `language_model` is a base LLM or a causal-LM head model."""
        if config.image_token_id is not None and not 0 <= config.image_token_id < config.text_config.vocab_size:
            raise ValueError(
                f"MergeBridgeConfig.image_token_id={config.image_token_id} is outside the LLM vocabulary "
                f"(vocab_size={config.text_config.vocab_size})"
            )
        self.vision_tower = TokenMergingVisionTower(AutoModel.from_config(config.vision_config),
                                                    config.vision_merging)
        self.temporal = (
            TemporalTokenMerging(config.vision_config.hidden_size, config.vision_config.num_hidden_layers,
                                 config.temporal_dim, config.temporal_heads)
            if config.temporal_merging else None
        )
        self.bridge = MergeBridgeBridge(config)
        self.language_model = language_model
        self.post_init()
        self.apply_freezing()
        if config.image_token_id is not None and self.generation_config is not None:
            # The placeholder must never be generated: it would be read as an image slot on the next step.
            suppressed = set(self.generation_config.suppress_tokens or []) | {config.image_token_id}
            self.generation_config.suppress_tokens = sorted(suppressed)

    def apply_freezing(self) -> None:
        """Freeze the towers the config marks frozen (temporal-merging parameters always train)."""
        self.vision_tower.requires_grad_(not self.config.freeze_vision)
        self.language_model.requires_grad_(not self.config.freeze_llm)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: Tensor, track_sources: bool = False) -> Tensor:
        """Visual prefix for images (B, 3, H, W) or videos (B, T, 3, H, W): (B, M, C_llm)."""
        features, _ = self._image_features(pixel_values, track_sources)
        return features

    def _image_features(self, pixel_values: Tensor, track_sources: bool = False) -> tuple[Tensor, list[int]]:
        if pixel_values.ndim == 5:  # video
            b, t = pixel_values.shape[:2]
            if t == 0:
                raise ValueError("MergeBridge: a video with zero frames")
            frames = pixel_values.flatten(0, 1)  # (B*T, 3, H, W)
            hooks = (self.temporal.hook(t),) if self.temporal is not None else ()
        elif pixel_values.ndim == 4:
            b, t, frames, hooks = pixel_values.shape[0], 1, pixel_values, ()
        else:
            raise ValueError(f"MergeBridge: pixel_values must be (B, 3, H, W) or (B, T, 3, H, W), got {tuple(pixel_values.shape)}")
        frozen = self.config.freeze_vision and not hooks  # temporal hooks carry trainable parameters
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            vision = self.vision_tower(frames, hooks=hooks).last_hidden_state  # (B*T, N0, Cv)
        vision = vision.view(b, t, *vision.shape[1:]).mean(dim=1)  # (B, N0, Cv): frame mean (identity for images)
        return self.bridge(vision)

    def _merge_inputs(self, input_ids: Tensor | None, inputs_embeds: Tensor | None,
                      pixel_values: Tensor | None) -> tuple[Tensor, Tensor | None, list[int] | None]:
        """Embed the prompt and scatter the visual prefix into its `<image>` positions."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MergeBridge: give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, C_llm)
        if pixel_values is None:
            return inputs_embeds, None, None
        if input_ids is None:
            raise ValueError("MergeBridge: pixel_values need input_ids to locate the <image> tokens")
        features, counts = self._image_features(pixel_values)  # (B_img, M, C_llm)
        mask = input_ids == self.config.image_token_id  # (B, L)
        if int(mask.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"MergeBridge: input_ids hold {int(mask.sum())} image tokens (id {self.config.image_token_id}) but "
                f"{features.shape[0]} images x {features.shape[1]} visual tokens = {features.numel() // features.shape[-1]} "
                "are needed; build inputs with MergeBridgeProcessor"
            )
        features = features.to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1).expand_as(inputs_embeds), features)
        return inputs_embeds, features, counts

    def _check_length(self, inputs_embeds: Tensor, kwargs: dict[str, Any]) -> None:
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        cache = get_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if limit is not None and past + inputs_embeds.shape[1] > limit:
            raise ValueError(
                f"MergeBridge: sequence of {past + inputs_embeds.shape[1]} tokens is longer than the LLM context "
                f"(text_config.max_position_embeddings={limit})"
            )


class MergeBridgeModel(MergeBridgePreTrainedModel):
    """Vision tower + merging bridge + base LLM (no LM head): the multimodal sequence's hidden states."""

    def __init__(self, config: MergeBridgeConfig) -> None:
        super().__init__(config)
        self._build(config, AutoModel.from_config(config.text_config))

    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> MergeBridgeModelOutput:
        """`kwargs` go to the LLM unchanged, the cache among them under whichever name the caller used."""
        inputs_embeds, image_features, _ = self._merge_inputs(input_ids, inputs_embeds, pixel_values)
        self._check_length(inputs_embeds, kwargs)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=use_cache, **kwargs)
        return outputs_from(MergeBridgeModelOutput, out, image_hidden_states=image_features)


class MergeBridgeForConditionalGeneration(MergeBridgePreTrainedModel, GenerationMixin):
    """MergeBridge with the LLM's own LM head: captioning / VQA loss and `generate()`."""

    def __init__(self, config: MergeBridgeConfig) -> None:
        super().__init__(config)
        self._build(config, AutoModelForCausalLM.from_config(config.text_config))

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                **kwargs: Any) -> MergeBridgeOutput:
        r"""
        labels (`torch.LongTensor` of shape `(B, L)`, *optional*):
            Next-token targets aligned with `input_ids` (the LLM shifts them); -100 on image, prompt and
            padding positions, as `MergeBridgeProcessor(..., targets=...)` builds them.
        kwargs: passed to the LLM unchanged, the cache among them under whichever name the caller used.

        `generate()` is GenerationMixin's own: it sends `pixel_values` only at prefill (or on every step
        without a cache, when the prompt is re-read whole).
        """
        inputs_embeds, image_features, counts = self._merge_inputs(input_ids, inputs_embeds, pixel_values)
        self._check_length(inputs_embeds, kwargs)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
        return outputs_from(MergeBridgeOutput, out, image_hidden_states=image_features, bridge_token_counts=counts)

    @classmethod
    def from_vision_text_pretrained(cls, vision: str, text: str, bridge_init: str | None = None,
                                    **config_kwargs: Any) -> "MergeBridgeForConditionalGeneration":
        """Build from any supported vision checkpoint and any causal LM checkpoint (local dirs or hub ids).

        The LLM's tokenizer gets `<image>` (and a pad token) the same way `MergeBridgeProcessor.
        from_vision_text_pretrained` adds them, and the embeddings are resized to match. `bridge_init` names a
        BERT checkpoint whose encoder initialises the bridge (its shape then defines `bridge_config`).
        """
        from transformers import AutoConfig, AutoTokenizer

        vision_model = AutoModel.from_pretrained(vision)
        vision_config = getattr(vision_model.config, "vision_config", vision_model.config)  # CLIP/SigLIP: vision half
        llm = AutoModelForCausalLM.from_pretrained(text)
        tokenizer = AutoTokenizer.from_pretrained(text)
        image_token = config_kwargs.get("image_token", "<image>")
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        if len(tokenizer) > llm.config.vocab_size:
            llm.resize_token_embeddings(len(tokenizer))
        bert = None
        if bridge_init is not None:
            bert = AutoModel.from_pretrained(bridge_init)
            config_kwargs.setdefault("bridge_config", AutoConfig.from_pretrained(bridge_init))
        config = MergeBridgeConfig(vision_config=vision_config, text_config=llm.config,
                                   image_token_id=tokenizer.convert_tokens_to_ids(image_token), **config_kwargs)
        model = cls(config)
        _load_vision_weights(model.vision_tower.vision_model, vision_model)
        model.language_model.load_state_dict(llm.state_dict())
        if bert is not None:
            model.bridge.load_bert(bert)
        model.apply_freezing()
        return model


def _load_vision_weights(target: nn.Module, source: nn.Module) -> None:
    """Copy a vision checkpoint into the tower; a full CLIP/SigLIP model gives its `vision_model.*` half."""
    state = source.state_dict()
    if hasattr(source, "text_model"):
        state = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"vision checkpoint does not fit the tower: missing {missing[:5]}, unexpected {unexpected[:5]}")


__all__ = [
    "MergeBridgePreTrainedModel",
    "MergeBridgeModel",
    "MergeBridgeForConditionalGeneration",
    "MergeBridgeBridge",
    "MergeBridgeOutput",
    "MergeBridgeModelOutput",
]
