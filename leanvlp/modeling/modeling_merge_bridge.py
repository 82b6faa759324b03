
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.bert.modeling_bert import BertLayer
from transformers.utils.generic import can_return_tuple

from .configuration_merge_bridge import HEAD_NAMES, VISION_LEADING_TOKENS, MergeBridgeConfig
from .patch_selection import TextAwarePatchDetector, cls_similarity_scores, pta_loss, select_and_fuse
from .semantic_heads import IGNORE_INDEX, SemanticHeads
from .temporal_merging import TemporalTokenMerging
from .token_merging import (
    BertLayerAdapter,
    BlockHook,
    MergeState,
    TokenMergingEncoder,
    TokenMergingOutput,
    text_relevance,
)
from .transformers_compat import CACHE_NAME, get_cache, outputs_from
from .vision_tower import TokenMergingVisionTower


@dataclass
class MergeBridgeImageOutput(BaseModelOutputWithPooling):
    """Output of `get_image_features`, as transformers 5.x VLMs return it (serving engines read `pooler_output`).

    last_hidden_state: the tower's features the bridge reads (B, N, Cv) (`vision_feature_layer`; frame mean for
    videos); pooler_output: the visual prefix (B, M, C_llm); hidden_states / attentions: the tower's, when asked
    (per frame for videos); bridge_hidden_states / bridge_attentions: the bridge's before its output projection,
    when asked; bridge_token_counts: tokens after each bridge layer; vision_sources / bridge_sources: with
    `track_sources=True`, which input tokens each output token of the tower's last layer / of the bridge holds
    (B*T, N', N) / (B, M, N0) 0/1 (the `merge_map` input; N0 counts the bridge's inputs, after the detector).
    With `patch_detector` on: patch_logits (B, P) the detector's logits, kept_patches (B, K) the kept patches'
    grid indices (spatial order) and patch_text_aware (B,) which images were scored with prompt text (the
    others by their cosine with CLS); `last_hidden_state` stays the tower's unpruned features.
    """

    bridge_hidden_states: tuple[Tensor, ...] | None = None
    bridge_attentions: tuple[Tensor, ...] | None = None
    bridge_token_counts: list[int] | None = None
    vision_sources: Tensor | None = None
    bridge_sources: Tensor | None = None
    patch_logits: Tensor | None = None
    kept_patches: Tensor | None = None
    patch_text_aware: Tensor | None = None


@dataclass
class MergeBridgeModelOutput(BaseModelOutputWithPast):
    """Output of [`MergeBridgeModel`]: the LLM's fields (the cache under the installed release's name), then
    `image_outputs` ([`MergeBridgeImageOutput`]) when pixels were given."""

    image_outputs: MergeBridgeImageOutput | None = None


@dataclass
class MergeBridgeOutput(CausalLMOutputWithPast):
    """Output of [`MergeBridgeForConditionalGeneration`]: the LLM's fields, then `image_outputs`
    ([`MergeBridgeImageOutput`]) when pixels were given. `loss` is the caption/answer LM loss plus the weighted
    semantic-head losses when those heads are on and given targets, plus `pta_weight * loss_pta` when the patch
    detector is on and given `patch_labels`; `semantic_losses` holds each head's loss, `loss_pta` the PTA loss."""

    image_outputs: MergeBridgeImageOutput | None = None
    semantic_losses: dict[str, Tensor] | None = None
    loss_pta: Tensor | None = None


def prompt_embeds(inputs_embeds: Tensor, image_mask: Tensor, attention_mask: Tensor | None = None,
                  text_mask: Tensor | None = None) -> Tensor:
    """The text of text-guided merging: per row, the mean input embedding (B, C) of the prompt's text tokens.

    Those are the attended, non-image tokens after the row's first `<image>` token (the question of a VQA
    prompt; BOS and anything before the image are not text about it) where `text_mask` (B, L) allows (it
    excludes labelled targets in training and generated tokens in uncached generation). A row without any
    (a captioning prompt) gets zeros, which score every visual token alike: plain merging for that image.
    """
    keep = image_mask.cumsum(dim=1).gt(0) & ~image_mask  # (B, L) after the first image token, not an image token
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = keep & attention_mask.bool()
    if text_mask is not None:
        if text_mask.shape != keep.shape:
            raise ValueError(f"MergeBridge: text_guidance_mask must be (B, L) = {tuple(keep.shape)}, got shape "
                             f"{tuple(text_mask.shape)}")
        keep = keep & text_mask.bool()
    weights = keep.to(inputs_embeds.dtype).unsqueeze(-1)  # (B, L, 1)
    return (inputs_embeds.detach() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B, C)


def _tower_embeddings(tower: TokenMergingVisionTower, pixel_values: Tensor) -> Tensor:
    """The tower's embedded tokens (B, N, Cv) before its first block: what its text-guided merging scores."""
    with torch.no_grad():
        return tower.embed(pixel_values)


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

    def text_relevance(self, vision_tokens: Tensor, text_embeds: Tensor) -> Tensor:
        """Parameter-free relevance of vision-width tokens (B, N, Cv) to a prompt embedding (B, C_llm): (B, N).

        The bridge has no word embeddings, so the text stays in the LLM's input-embedding space and the tokens
        go there by the bridge's own linear route (input norm and projection, then the output projection, which
        is trained to put bridge tokens where the LLM reads them), skipping the transformer layers; the cosine
        there scores each token. A zero text embedding (no prompt text) scores every token 0: plain merging.
        """
        with torch.no_grad():
            mapped = self.output_proj(self.input_proj(self.input_norm(vision_tokens)))  # (B, N, C_llm)
            return text_relevance(mapped, text_embeds.to(mapped.dtype))

    def forward(self, vision_tokens: Tensor, track_sources: bool = False, output_hidden_states: bool = False,
                output_attentions: bool = False, text_embeds: Tensor | None = None) -> TokenMergingOutput:
        """`last_hidden_state` is the projected prefix (B, M, C_llm); hidden states stay in the bridge width.

        `text_embeds` (B, C_llm), the prompt's mean input embedding, steers text-guided merging when the bridge's
        merging config has `protect_relevant` > 0 (ignored otherwise, so the switch off costs nothing).
        """
        x = self.input_proj(self.input_norm(vision_tokens))  # (B, N0, Cb)
        if x.shape[1] != self.position_embeddings.num_embeddings:
            raise ValueError(
                f"MergeBridge: the vision tower gave {x.shape[1]} tokens but the bridge was configured for "
                f"{self.position_embeddings.num_embeddings} (vision_config.image_size / patch_size)"
            )
        relevance = None
        if text_embeds is not None and self.encoder.merging.protect_relevant > 0:
            relevance = self.text_relevance(vision_tokens, text_embeds)  # (B, N0)
        x = self.dropout(self.embed_norm(x + self.position_embeddings.weight))
        out = self.encoder(x, track_sources=track_sources, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, relevance=relevance)  # (B, M, Cb)
        out.last_hidden_state = self.output_proj(out.last_hidden_state)  # (B, M, C_llm)
        return out

    def load_bert(self, bert: PreTrainedModel) -> None:
        """Initialise positions, embedding LayerNorm and every layer from a BERT model's weights.

        BERT adds token-type row 0 to every input; it is folded into the positions (both are constants added
        before the LayerNorm), so the bridge starts exactly where a BERT-initialised EVLGen bridge does.
        """
        base = getattr(bert, "bert", bert)
        n = self.position_embeddings.num_embeddings
        if base.embeddings.position_embeddings.num_embeddings < n:
            raise ValueError(f"bridge_init: BERT has {base.embeddings.position_embeddings.num_embeddings} positions, need {n}")
        if len(base.encoder.layer) < len(self.encoder.layers):
            raise ValueError(f"bridge_init: BERT has {len(base.encoder.layer)} layers, the bridge {len(self.encoder.layers)}")
        with torch.no_grad():
            positions = base.embeddings.position_embeddings.weight[:n]  # (N0, Cb)
            token_type = getattr(base.embeddings, "token_type_embeddings", None)
            if token_type is not None:
                positions = positions + token_type.weight[0]
            self.position_embeddings.weight.copy_(positions)
        self.embed_norm.load_state_dict(base.embeddings.LayerNorm.state_dict())
        for ours, theirs in zip(self.encoder.layers, base.encoder.layer):
            ours.load_state_dict(theirs.state_dict())


class _LayerCapture(BlockHook):
    """Keeps one layer's output (before the tower's final norm) as the block loop passes it."""

    def __init__(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx
        self.hidden: Tensor | None = None

    def after_block(self, layer_idx: int, hidden: Tensor, state: MergeState) -> tuple[Tensor, MergeState]:
        if layer_idx == self.layer_idx:
            self.hidden = hidden
        return hidden, state


class MergeBridgePreTrainedModel(PreTrainedModel):
    config_class = MergeBridgeConfig
    config: MergeBridgeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True  # LLM decoder layers, and every block of the tower and the bridge
    # Every block loop dispatches through transformers' attention interface (token_merging.py): SDPA and flex
    # are tested. Flash attention (untested here, and refused whenever merging needs a bias), a compiled full
    # graph (the image-token count check reads a tensor) and the attention-backend / TP contract (the tower
    # and bridge run their own attention calls) are not claimed.
    _supports_sdpa = True
    _supports_flex_attn = True
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

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader, then the config's freezing (loading recreates every parameter as trainable)."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).apply_freezing()
        return loaded


class MergeBridgeModel(MergeBridgePreTrainedModel):
    """Vision tower + merging bridge + base LLM (no LM head): the multimodal sequence's hidden states."""

    def __init__(self, config: MergeBridgeConfig) -> None:
        super().__init__(config)
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
        self.language_model = AutoModel.from_config(config.text_config)
        det = config.patch_detector
        self.detector = TextAwarePatchDetector(config.vision_config.hidden_size, config.text_config.hidden_size,
                                               det["hidden_size"]) if det["enabled"] else None  # off: no parameters
        self.post_init()
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """Freeze the towers the config marks frozen (temporal-merging parameters always train)."""
        self.vision_tower.requires_grad_(not self.config.freeze_vision)
        self.language_model.requires_grad_(not self.config.freeze_llm)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _output_flags(self, hidden_states: bool | None, attentions: bool | None) -> tuple[bool, bool]:
        """The explicit switches, else the config's (as transformers models resolve them)."""
        return (self.config.output_hidden_states if hidden_states is None else hidden_states,
                self.config.output_attentions if attentions is None else attentions)

    @can_return_tuple
    def get_image_features(self, pixel_values: Tensor, output_hidden_states: bool | None = None,
                           output_attentions: bool | None = None, track_sources: bool = False,
                           text_embeds: Tensor | None = None, **kwargs: Any) -> MergeBridgeImageOutput:
        """Images (B, 3, H, W) or videos (B, T, 3, H, W) -> `pooler_output`, the visual prefix (B, M, C_llm).

        `text_embeds` (B, C_llm): per image, the mean LLM input embedding of its prompt's text (`prompt_embeds`),
        for text-guided merging and the patch detector; None (or a zero row) merges plainly and lets the detector
        fall back to CLS similarity. `kwargs`: the per-image kwargs other VLMs
        take (`image_sizes`...), which callers such as serving engines pass along; MergeBridge's fixed-size
        towers do not need them.
        """
        output_hidden_states, output_attentions = self._output_flags(output_hidden_states, output_attentions)
        if pixel_values.ndim == 5:  # video
            b, t = pixel_values.shape[:2]
            if t == 0:
                raise ValueError("MergeBridge: a video with zero frames")
            if t > 1 and self.config.vision_merges_tokens:
                raise ValueError(
                    f"MergeBridge: a {t}-frame video with vision_merging.r={self.config.vision_merging['r']}: each "
                    "frame would merge different token groups, so the frame mean would mix unrelated tokens; set "
                    "vision_merging r=0 for video (bridge merging is unaffected)"
                )
            frames = pixel_values.flatten(0, 1)  # (B*T, 3, H, W)
            hooks: list[BlockHook] = [self.temporal.hook(t)] if self.temporal is not None else []
        elif pixel_values.ndim == 4:
            b, t, frames, hooks = pixel_values.shape[0], 1, pixel_values, []
        else:
            raise ValueError(
                f"MergeBridge: pixel_values must be (B, 3, H, W) or (B, T, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        width = self.config.text_config.hidden_size
        if text_embeds is not None and text_embeds.shape != (b, width):
            raise ValueError(f"MergeBridge: text_embeds must be (images, C_llm) = {(b, width)}, got shape "
                             f"{tuple(text_embeds.shape)}")
        frozen = self.config.freeze_vision and not hooks  # temporal hooks carry trainable parameters
        capture = None if self.config.vision_feature_norm else _LayerCapture(self.config.vision_feature_layer_index)
        relevance = None
        if text_embeds is not None and self.config.vision_text_guided:  # images only: video needs vision r=0
            relevance = self.bridge.text_relevance(_tower_embeddings(self.vision_tower, frames), text_embeds)  # (B, N)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            tower = self.vision_tower(frames, hooks=[*hooks, *([capture] if capture else [])], relevance=relevance,
                                      track_sources=track_sources, output_hidden_states=output_hidden_states,
                                      output_attentions=output_attentions)
        vision = capture.hidden if capture is not None else tower.last_hidden_state  # (B*T, N, Cv)
        vision = vision.view(b, t, *vision.shape[1:]).mean(dim=1)  # (B, N, Cv): frame mean (identity for images)
        selected, detection = vision, {}
        if self.detector is not None:
            selected, detection = self.select_patches(vision, text_embeds)  # (B, 1 + K + 1, Cv)
        bridge = self.bridge(selected, track_sources=track_sources, output_hidden_states=output_hidden_states,
                             output_attentions=output_attentions, text_embeds=text_embeds)
        return MergeBridgeImageOutput(
            last_hidden_state=vision, pooler_output=bridge.last_hidden_state, hidden_states=tower.hidden_states,
            attentions=tower.attentions, bridge_hidden_states=bridge.hidden_states,
            bridge_attentions=bridge.attentions, bridge_token_counts=bridge.token_counts,
            vision_sources=tower.sources, bridge_sources=bridge.sources, **detection,
        )

    def select_patches(self, vision: Tensor, text_embeds: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The patch detector on the bridge's input (B, N, Cv): keep the top K patches, fuse the rest into one token.

        Rows with prompt text (a non-zero `text_embeds` row, (B, C_llm)) rank patches by the text-aware detector's
        sigmoid scores and fuse by `fuse_weights`; rows without (captioning, or no text given) by PatchAlign's
        text-agnostic scores, the cosine with CLS. Returns the tokens (B, 1 + K + 1, Cv) and the output fields.
        """
        det, leading = self.config.patch_detector, VISION_LEADING_TOKENS[self.config.vision_config.model_type]
        if text_embeds is None:
            text_embeds = vision.new_zeros(vision.shape[0], self.config.text_config.hidden_size)
        aware = text_embeds.ne(0).any(dim=-1)  # (B,)
        logits = self.detector(vision[:, leading:], text_embeds.to(vision.dtype))  # (B, P)
        agnostic = cls_similarity_scores(vision, leading)  # (B, P)
        aware_fuse = logits if det["fuse_weights"] == "logits" else logits.sigmoid()
        scores = torch.where(aware[:, None], logits.sigmoid(), agnostic)
        fuse = torch.where(aware[:, None], aware_fuse, agnostic)
        tokens, _, _, kept = select_and_fuse(vision, scores, self.config.num_kept_patches, num_prefix=leading,
                                             fuse_scores=fuse)
        return tokens, {"patch_logits": logits, "kept_patches": kept, "patch_text_aware": aware}

    def get_placeholder_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor) -> Tensor:
        """(B, L) True at `<image>` positions, from the ids or, without them, from the embedded placeholder."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(token).to(inputs_embeds.dtype)).all(dim=-1)

    def _check_length(self, inputs_embeds: Tensor, kwargs: dict[str, Any]) -> None:
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        cache = get_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if limit is not None and past + inputs_embeds.shape[1] > limit:
            raise ValueError(
                f"MergeBridge: sequence of {past + inputs_embeds.shape[1]} tokens is longer than the LLM context "
                f"(text_config.max_position_embeddings={limit})"
            )

    @can_return_tuple
    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                text_guidance_mask: Tensor | None = None, **kwargs: Any) -> MergeBridgeModelOutput:
        """Embed the prompt, scatter the visual prefix into its `<image>` positions, run the base LLM.

        `text_guidance_mask` (B, L) bool: which positions may serve as the prompt text of text-guided merging
        (default: all; see `prompt_embeds`); the conditional-generation model excludes labelled targets with it.
        `kwargs` go to the LLM unchanged, the cache among them under whichever name the caller used.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MergeBridge: give exactly one of input_ids or inputs_embeds")
        output_hidden_states, output_attentions = self._output_flags(output_hidden_states, output_attentions)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, C_llm)
        image_outputs = None
        if pixel_values is not None:
            mask = self.get_placeholder_mask(input_ids, inputs_embeds)  # (B, L)
            num_images, per_image = pixel_values.shape[0], self.config.num_image_tokens
            if int(mask.sum()) != num_images * per_image:
                raise ValueError(
                    f"MergeBridge: the inputs hold {int(mask.sum())} image tokens (id {self.config.image_token_id}) "
                    f"but {num_images} images x {per_image} visual tokens = {num_images * per_image} are needed; "
                    "build inputs with MergeBridgeProcessor"
                )
            text_embeds = None
            if self.config.reads_prompt_text:
                text_embeds = prompt_embeds(inputs_embeds, mask, attention_mask, text_guidance_mask)  # (B, C_llm)
                text_embeds = text_embeds.repeat_interleave(mask.sum(dim=1) // per_image, dim=0)  # (B_img, C_llm)
            image_outputs = self.get_image_features(pixel_values, output_hidden_states=output_hidden_states,
                                                    output_attentions=output_attentions, text_embeds=text_embeds,
                                                    return_dict=True)
            features = image_outputs.pooler_output  # (B_img, M, C_llm)
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1).expand_as(inputs_embeds), features)
        self._check_length(inputs_embeds, kwargs)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=use_cache,
                                  output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                  **kwargs)
        return outputs_from(MergeBridgeModelOutput, out, image_outputs=image_outputs)


class MergeBridgeForConditionalGeneration(MergeBridgePreTrainedModel, GenerationMixin):
    """MergeBridge with an LM head: captioning / VQA loss and `generate()`.

    `vision_tower`, `temporal`, `bridge` and `language_model` (now the base LLM) are read-only shortcuts into
    `model`, as in-tree VLMs keep them.
    """

    def __init__(self, config: MergeBridgeConfig) -> None:
        super().__init__(config)
        self.model = MergeBridgeModel(config)
        embeddings = self.model.get_input_embeddings()  # (V, C_embed)
        self.lm_head = nn.Linear(embeddings.embedding_dim, config.text_config.vocab_size, bias=False)
        # Which parameter the head ties to depends on the LLM family (embed_tokens, decoder.embed_tokens, wte...).
        embed_name = next(n for n, p in self.model.language_model.named_parameters() if p is embeddings.weight)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{embed_name}"}
        heads = config.semantic_heads
        self.semantic_heads = SemanticHeads(
            config.vision_config.hidden_size, heads["num_classes"], heads["num_attributes"], heads["teacher_size"],
            **{name: heads[name]["enabled"] for name in HEAD_NAMES}, region_loss=heads["region_feature"]["loss"],
        ) if config.semantic_heads_enabled else None  # off: not built, no parameters
        self.post_init()
        self.apply_freezing()
        if config.image_token_id is not None:
            # The placeholder must never be generated: it would be read as an image slot on the next step.
            suppressed = set(self.generation_config.suppress_tokens or []) | {config.image_token_id}
            self.generation_config.suppress_tokens = sorted(suppressed)

    @property
    def vision_tower(self) -> TokenMergingVisionTower:
        return self.model.vision_tower

    @property
    def temporal(self) -> TemporalTokenMerging | None:
        return self.model.temporal

    @property
    def bridge(self) -> MergeBridgeBridge:
        return self.model.bridge

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def apply_freezing(self) -> None:
        """Freeze the towers the config marks frozen; the LM head follows `freeze_llm`."""
        self.model.apply_freezing()
        self.lm_head.requires_grad_(not self.config.freeze_llm)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: Tensor, **kwargs: Any) -> MergeBridgeImageOutput:
        """See [`MergeBridgeModel.get_image_features`]: `pooler_output` is the visual prefix (B, M, C_llm)."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                text_guidance_mask: Tensor | None = None, class_labels: Tensor | None = None,
                attribute_labels: Tensor | None = None, attribute_mask: Tensor | None = None,
                region_box_masks: Tensor | None = None, region_features: Tensor | None = None,
                region_mask: Tensor | None = None, patch_labels: Tensor | None = None,
                pta_mask: Tensor | None = None, **kwargs: Any) -> MergeBridgeOutput:
        r"""
        labels (`torch.LongTensor` of shape `(B, L)`, *optional*):
            Next-token targets aligned with `input_ids` (shifted inside the loss, or pass `shift_labels`); -100
            on image, prompt and padding positions, as `MergeBridgeProcessor(..., targets=...)` builds them.
        logits_to_keep (`int` or `torch.Tensor`): compute logits for the last n positions only (0: all), or for
            the given sequence indices.
        kwargs: passed to the LLM, the cache among them under whichever name the caller used; `output_attentions`
            / `output_hidden_states` also reach the tower and the bridge (`image_outputs`).

        text_guidance_mask (`torch.BoolTensor` of shape `(B, L)`, *optional*):
            Positions that may serve as the prompt text of text-guided merging (see [`prompt_embeds`]); labelled
            positions never do, so the answer a sample trains on never steers its own image's merging.
        class_labels, attribute_labels, attribute_mask, region_box_masks, region_features, region_mask:
            Per-image semantic-head targets over the patch grid, as `PatchAlignProcessor` builds them from boxes
            (see `SemanticHeads`); used only when `config.semantic_heads` enables the head.
        patch_labels (`torch.FloatTensor` of shape `(B_img, P)`), pta_mask (`torch.BoolTensor` of shape `(B_img,)`):
            PTA targets per image patch from boxes (`MergeBridgeProcessor(boxes=...)`); used only when
            `config.patch_detector` is on. Images whose prompt has no text never count (their detector had none).

        `generate()` is GenerationMixin's own: it sends `pixel_values` only at prefill (or on every step
        without a cache, when the prompt is re-read whole; text guidance then still reads the prompt only).
        """
        if labels is not None and self.config.reads_prompt_text:
            unlabelled = labels == IGNORE_INDEX  # (B, L)
            text_guidance_mask = unlabelled if text_guidance_mask is None else text_guidance_mask.bool() & unlabelled
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         text_guidance_mask=text_guidance_mask, return_dict=True, **kwargs)
        hidden = out.last_hidden_state  # (B, L, C)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])  # (B, L', V)
        softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if softcap is not None:  # Gemma 2/3 cap the logits after their head
            logits = torch.tanh(logits / softcap) * softcap
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        targets = dict(class_labels=class_labels, attribute_labels=attribute_labels, attribute_mask=attribute_mask,
                       region_box_masks=region_box_masks, region_features=region_features, region_mask=region_mask)
        semantic_losses = None
        if self.semantic_heads is not None and any(v is not None for v in targets.values()):
            semantic_losses = self._semantic_losses(pixel_values, out.image_outputs, targets)
            weights = {name: self.config.semantic_heads[name]["weight"] for name in semantic_losses}
            weighted = sum(weights[name] * value for name, value in semantic_losses.items())
            loss = weighted if loss is None else loss + weighted
        loss_pta = None
        if self.config.detector_enabled and patch_labels is not None:
            loss_pta = self._pta_loss(out.image_outputs, patch_labels, pta_mask)
            weighted = self.config.patch_detector["pta_weight"] * loss_pta
            loss = weighted if loss is None else loss + weighted
        return outputs_from(MergeBridgeOutput, out, loss=loss, logits=logits, semantic_losses=semantic_losses,
                            loss_pta=loss_pta)

    @staticmethod
    def _pta_loss(image_outputs: MergeBridgeImageOutput | None, patch_labels: Tensor,
                  pta_mask: Tensor | None) -> Tensor:
        """PTA on the detector's logits, over the images that have boxes and were scored with prompt text."""
        if image_outputs is None or image_outputs.patch_logits is None:
            raise ValueError("MergeBridge: patch_labels need images (pixel_values) for the patch detector to score")
        logits, aware = image_outputs.patch_logits, image_outputs.patch_text_aware  # (B_img, P), (B_img,)
        if patch_labels.shape != logits.shape:
            raise ValueError(f"MergeBridge: patch_labels of shape {tuple(patch_labels.shape)} does not fit "
                             f"{logits.shape[0]} images x {logits.shape[1]} patches")
        if pta_mask is not None and pta_mask.shape != aware.shape:
            raise ValueError(f"MergeBridge: pta_mask must have shape ({aware.shape[0]},) (one flag per image), got "
                             f"{tuple(pta_mask.shape)}")
        mask = aware if pta_mask is None else aware & pta_mask.to(aware.device).bool()
        return pta_loss(logits, patch_labels.to(logits.device), mask)

    def _semantic_losses(self, pixel_values: Tensor | None, image_outputs: MergeBridgeImageOutput | None,
                         targets: dict[str, Tensor | None]) -> dict[str, Tensor]:
        """The heads' losses on the patch tokens the bridge reads (the leading CLS token dropped)."""
        if pixel_values is None or pixel_values.ndim != 4:
            got = "none" if pixel_values is None else f"shape {tuple(pixel_values.shape)}"
            raise ValueError(f"MergeBridge: semantic-head targets need images (B, 3, H, W) as pixel_values, got {got} "
                             "(videos have no per-frame boxes)")
        leading = VISION_LEADING_TOKENS[self.config.vision_config.model_type]
        patches = image_outputs.last_hidden_state[:, leading:]  # (B_img, P, Cv)
        for name in ("class_labels", "attribute_labels", "attribute_mask", "region_box_masks"):
            value = targets[name]
            if value is None:
                continue
            grid = (value.shape[0], value.shape[-1]) if name == "region_box_masks" else value.shape[:2]
            if tuple(grid) != tuple(patches.shape[:2]):
                raise ValueError(f"MergeBridge: {name} of shape {tuple(value.shape)} does not fit {patches.shape[0]} "
                                 f"images x {patches.shape[1]} patches")
        return self.semantic_heads(patches, **targets)

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: dict[str, Any],
                                            is_encoder_decoder: bool = False, num_new_tokens: int = 1
                                            ) -> dict[str, Any]:
        """GenerationMixin's update, plus a `text_guidance_mask` that marks the prompt: without a cache every step
        re-reads the images with the whole sequence, and text guidance must read the same prompt as at prefill."""
        attention_mask = model_kwargs.get("attention_mask")
        guidance = model_kwargs.get("text_guidance_mask")
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        if self.config.reads_prompt_text and (guidance is not None or attention_mask is not None):
            if guidance is None:  # after prefill: the prompt is everything so far
                guidance = torch.ones(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
            model_kwargs["text_guidance_mask"] = torch.cat(
                [guidance.bool(), guidance.new_zeros((guidance.shape[0], num_new_tokens), dtype=torch.bool)], dim=-1)
        return model_kwargs

    @classmethod
    def from_vision_text_pretrained(cls, vision: str, text: str, bridge_init: str | None = None,
                                    **config_kwargs: Any) -> "MergeBridgeForConditionalGeneration":
        """Build from any supported vision checkpoint and any causal LM checkpoint (local dirs or hub ids).

        The LLM's tokenizer gets `<image>` (and a pad token) the same way `MergeBridgeProcessor.
        from_vision_text_pretrained` adds them, and the embeddings are resized to match. `bridge_init` names a
        BERT checkpoint whose encoder initialises the bridge (its shape then defines `bridge_config`). The bridge
        reads the tower's penultimate layer without its final norm unless `vision_feature_layer` /
        `vision_feature_norm` say otherwise (as EVLGen and Llava).
        """
        from transformers import AutoConfig, AutoTokenizer

        vision_model = AutoModel.from_pretrained(vision)
        vision_config = getattr(vision_model.config, "vision_config", vision_model.config)  # CLIP/SigLIP: vision half
        llm = AutoModelForCausalLM.from_pretrained(text)
        head = llm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError(
                f"MergeBridge: the LLM {text!r} has an LM head with a bias; only bias-free heads are supported"
            )
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
        config_kwargs.setdefault("vision_feature_layer", -2)
        config_kwargs.setdefault("vision_feature_norm", False)
        config = MergeBridgeConfig(vision_config=vision_config, text_config=llm.config,
                                   image_token_id=tokenizer.convert_tokens_to_ids(image_token), **config_kwargs)
        model = cls(config)
        _load_vision_weights(model.model.vision_tower.vision_model, vision_model)
        model.model.language_model.load_state_dict(llm.base_model.state_dict())
        if model.lm_head.weight is not model.get_input_embeddings().weight:  # untied: the LLM's own head
            model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
        if bert is not None:
            model.model.bridge.load_bert(bert)
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
    "MergeBridgeImageOutput",
    "MergeBridgeOutput",
    "MergeBridgeModelOutput",
    "prompt_embeds",
]
