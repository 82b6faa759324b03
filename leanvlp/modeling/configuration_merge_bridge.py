"""MergeBridge configuration: frozen vision tower -> token-merging bridge -> frozen causal LLM (SimVLG)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, BertConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_patch_align import FUSE_WEIGHTS
from .token_merging import TokenMergingConfig
from .transformers_compat import check_transformers_version

check_transformers_version()  # one clear line on an unsupported release, before anything deeper fails

# Vision towers the token-merging wrapper runs, with the number of leading tokens (CLS) each adds.
VISION_LEADING_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0, "vit": 1, "dinov2": 1}

# EVLGen's bridge: BERT-base shaped, r = 19 merges per layer, plain-mean merging (their released code).
DEFAULT_BRIDGE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
DEFAULT_BRIDGE_MERGING = dict(r=19, mode="mean", prop_attn=False)
# Semantic heads (semantic_heads.py) as auxiliary losses on the tower's patch tokens: all off by default.
HEAD_NAMES = ("object_class", "attribute", "region_feature")
DEFAULT_HEADS = dict(
    object_class=dict(enabled=False, weight=1.0),
    attribute=dict(enabled=False, weight=1.0),
    region_feature=dict(enabled=False, weight=1.0, loss="smooth_l1"),
    num_classes=0,
    num_attributes=0,
    teacher_size=0,
)
# COPA's text-aware patch detector on the tokens the bridge reads, with PTA from boxes: off by default.
DEFAULT_DETECTOR = dict(enabled=False, keep_ratio=0.5, hidden_size=None, fuse_weights="logits", pta_weight=1.0)
# EVA-CLIP ViT-g/14 is not in transformers; CLIP ViT-L/14 @224 has the same 257 tokens.
DEFAULT_VISION = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, patch_size=14, image_size=224,
)


def _as_config(value: dict | PretrainedConfig | None, default: dict, field: str) -> PretrainedConfig:
    """A sub-config from a config, a dict carrying its own `model_type`, or None (the default)."""
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        value = dict(default)
    if not isinstance(value, dict):
        raise TypeError(f"MergeBridgeConfig.{field} must be a dict or a PretrainedConfig, got {type(value).__name__}")
    value = dict(value)
    model_type = value.pop("model_type", default.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"MergeBridgeConfig.{field}: unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type](**value)


def vision_num_tokens(vision_config: PretrainedConfig) -> int:
    """Sequence length the vision tower produces for its configured image size: patches (+ CLS)."""
    image_size, patch_size = vision_config.image_size, vision_config.patch_size
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    patch_size = patch_size if isinstance(patch_size, int) else patch_size[0]
    return (image_size // patch_size) ** 2 + VISION_LEADING_TOKENS[vision_config.model_type]


class MergeBridgeConfig(PretrainedConfig):
    r"""
    Configuration of a [`MergeBridgeForConditionalGeneration`]: a vision tower whose tokens pass a BERT-style
    bridge that merges similar tokens between attention and FFN of every layer (ToMe bipartite soft matching),
    then a causal LLM that reads the short merged sequence as a soft visual prefix (SimVLG / EVLGen).

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Vision tower config; one of `clip_vision_model`, `siglip_vision_model`, `vit`, `dinov2`.
            Defaults to a CLIP ViT-L/14 at 224 px (257 tokens, like EVLGen's EVA ViT-g/14).
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Any causal LM config (defaults to OPT-125m's shape).
        bridge_config (`dict` or `BertConfig`, *optional*):
            The bridge's BERT encoder shape (defaults to BERT-base: 12 layers, 768 wide, 12 heads). Its word
            embeddings are never built: the bridge reads projected visual tokens plus learned positions.
        bridge_merging (`dict`, *optional*):
            [`TokenMergingConfig`] of the bridge. Defaults to EVLGen's: r=19 per layer, `"mean"` mode, no
            proportional attention; `{"r": 19, "mode": "size_weighted", "prop_attn": True}` is ToMe's variant.
            `protected` defaults to the tower's leading (CLS) token count.
        vision_merging (`dict`, *optional*):
            [`TokenMergingConfig`] inside the vision tower itself (defaults to r=0: no merging). Videos of more than
            one frame need r=0 here: each frame would merge different token groups before the frame mean.

            Text-guided merging: `protect_relevant` > 0 in either merging config keeps, in every merging block, up to
            that many tokens most relevant to the prompt out of the matching (see [`TokenMergingConfig`]). The text
            is the prompt after the `<image>` block (the question for VQA; never the target tokens, which carry
            labels); a prompt without text (captioning) merges plainly. Relevance is parameter-free: each token
            taken through the model's own linear route into the LLM width (bridge `input_norm` -> `input_proj` ->
            `output_proj`, skipping the transformer blocks) is compared by cosine with the mean LLM input embedding
            of the prompt's text tokens. Token counts do not change (the processor's `<image>` expansion holds).
        vision_feature_layer (`int`, *optional*, defaults to -1):
            Which tower layer the bridge reads, indexed like the tower's `hidden_states` (1..L, or -1 = last,
            -2 = penultimate...; the embeddings, index 0, are not a choice). `from_vision_text_pretrained` uses -2,
            as EVLGen and Llava.
        vision_feature_norm (`bool`, *optional*):
            Apply the tower's final norm (ViT/DINOv2 `layernorm`, SigLIP `post_layernorm`; CLIP has none) to the
            features. Only possible for the last layer; defaults to `True` there and `False` otherwise.
        image_token_id (`int`, *optional*):
            Token id of the image placeholder in the LLM vocabulary (set by the processor builder).
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The placeholder string.
        freeze_vision (`bool`, *optional*, defaults to `True`): keep the vision tower frozen.
        freeze_llm (`bool`, *optional*, defaults to `True`): keep the LLM (and its LM head) frozen. Both are
            applied at construction and after `from_pretrained`; call `model.apply_freezing()` after changing them.
        temporal_merging (`bool`, *optional*, defaults to `False`):
            Video: soft attentive temporal token merging inside every vision block (gate initialised at 0).
            Needs `vision_merging` r=0 (the temporal attention pairs the same position across frames).
        tie_word_embeddings (`bool`, *optional*):
            Tie the LM head to the LLM's input embeddings; defaults to `text_config.tie_word_embeddings`.
        temporal_dim (`int`, *optional*, defaults to 256): query/key width of the temporal attention.
        temporal_heads (`int`, *optional*, defaults to 8): heads of the temporal attention.
        semantic_heads (`dict`, *optional*):
            The semantic heads as auxiliary losses on the patch tokens the bridge reads (a trainable tower only):
            `object_class`, `attribute`, `region_feature`, each `{"enabled": bool, "weight": float}`
            (`region_feature` also `"loss": "smooth_l1" | "cosine"`), and the sizes `num_classes` (background is
            added as the last class), `num_attributes`, `teacher_size`. Targets (`class_labels`, `attribute_labels`
            / `attribute_mask`, `region_box_masks` / `region_features` / `region_mask`) are built from boxes as
            `PatchAlignProcessor` builds them. All off by default: no parameters, no change to any output.
        patch_detector (`dict`, *optional*):
            COPA's text-aware patch detector between the tower and the bridge (PatchAlign's, `patch_selection.py`):
            `enabled` (False: nothing is built and no output changes), `keep_ratio` (0.5: of the P patch tokens at
            `vision_feature_layer` the top K = round(keep_ratio * P) stay in spatial order and the rest are fused
            into one token, so the bridge reads CLS + K + 1 tokens and `num_image_tokens` follows), `hidden_size`
            (the detector MLP's width; None = the tower's), `fuse_weights` (`"logits"` or `"scores"`, as
            PatchAlign's) and `pta_weight` (1.0: the PTA loss's weight in `loss`). The text is the prompt's, as
            text-guided merging reads it (the mean LLM input embedding of the prompt's text after `<image>`: the
            question for VQA; never target tokens). A prompt without text (captioning) falls back to PatchAlign's
            text-agnostic scores, each patch's cosine with CLS, so K stays the same. PTA: `patch_labels` (B, P) /
            `pta_mask` (B,) from boxes (`MergeBridgeProcessor(boxes=...)`), BCE on the detector's logits for the
            images whose prompt has text; the loss is added to `loss` and reported as `loss_pta`. Needs a tower
            with CLS (not SigLIP) and no tower merging up to `vision_feature_layer` (labels are per patch).

    Example:

    ```python
    >>> from leanvlp import MergeBridgeConfig, MergeBridgeForConditionalGeneration
    >>> config = MergeBridgeConfig(
    ...     vision_config={"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    ...                    "intermediate_size": 64, "image_size": 32, "patch_size": 8},
    ...     text_config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    ...                  "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 100},
    ...     bridge_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    ...     bridge_merging={"r": 4}, image_token_id=99)
    >>> config.num_image_tokens  # 17 vision tokens -> 13 -> 9
    9
    >>> model = MergeBridgeForConditionalGeneration(config)

    With the text-aware patch detector (16 patches -> CLS + 8 kept + 1 fused = 10 bridge inputs -> 6 -> 4):

    >>> detected = MergeBridgeConfig(**{**config.to_dict(), "patch_detector": {"enabled": True, "keep_ratio": 0.5}})
    >>> detected.num_bridge_input_tokens, detected.num_image_tokens
    (10, 4)

    ```
    """

    model_type = "merge_bridge"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig, "bridge_config": BertConfig}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        bridge_config: dict | PretrainedConfig | None = None,
        bridge_merging: dict | TokenMergingConfig | None = None,
        vision_merging: dict | TokenMergingConfig | None = None,
        image_token_id: int | None = None,
        image_token: str = "<image>",
        vision_feature_layer: int = -1,
        vision_feature_norm: bool | None = None,
        freeze_vision: bool = True,
        freeze_llm: bool = True,
        temporal_merging: bool = False,
        temporal_dim: int = 256,
        temporal_heads: int = 8,
        tie_word_embeddings: bool | None = None,
        semantic_heads: dict | None = None,
        patch_detector: dict | None = None,
        **kwargs: Any,
    ) -> None:
        self.vision_config = _as_config(vision_config, DEFAULT_VISION, "vision_config")
        if self.vision_config.model_type not in VISION_LEADING_TOKENS:
            raise ValueError(
                f"MergeBridgeConfig.vision_config: model_type {self.vision_config.model_type!r} is not supported; "
                f"use one of {sorted(VISION_LEADING_TOKENS)}"
            )
        self.text_config = _as_config(text_config, {"model_type": "opt"}, "text_config")
        if self.text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"MergeBridgeConfig.text_config: model_type {self.text_config.model_type!r} is not a causal LM"
            )
        if isinstance(bridge_config, dict):
            bridge_config = {k: v for k, v in bridge_config.items() if k != "model_type"}
            bridge_config = BertConfig(**{**DEFAULT_BRIDGE, **bridge_config})
        self.bridge_config = bridge_config if bridge_config is not None else BertConfig(**DEFAULT_BRIDGE)
        leading = VISION_LEADING_TOKENS[self.vision_config.model_type]
        self.bridge_merging = self._merging(bridge_merging, DEFAULT_BRIDGE_MERGING, leading, "bridge_merging")
        self.vision_merging = self._merging(vision_merging, {"r": 0}, leading, "vision_merging")
        self.image_token_id = image_token_id
        self.image_token = image_token
        self.freeze_vision = freeze_vision
        self.freeze_llm = freeze_llm
        self.temporal_merging = temporal_merging
        self.temporal_dim = temporal_dim
        self.temporal_heads = temporal_heads
        self.semantic_heads = self._heads(semantic_heads)
        self.patch_detector = self._detector(patch_detector)
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_norm = vision_feature_layer == -1 if vision_feature_norm is None else vision_feature_norm
        # transformers ties the LM head when the top-level config says so; the LLM's config decides by default.
        self.tie_word_embeddings = (getattr(self.text_config, "tie_word_embeddings", False)
                                    if tie_word_embeddings is None else tie_word_embeddings)
        super().__init__(**kwargs)
        self._check_vision_features()
        if temporal_merging and self.vision_merges_tokens:
            raise ValueError(
                f"MergeBridgeConfig: temporal_merging=True needs vision_merging r=0, got r={self.vision_merging['r']} "
                "(frames would merge different token groups, so the temporal attention would pair unrelated tokens)"
            )
        # Validate both schedules against their depths now, not deep inside a forward pass.
        self.bridge_merging_config.schedule(self.bridge_config.num_hidden_layers)
        self.vision_merging_config.schedule(self.vision_config.num_hidden_layers)
        self._check_detector()
        self._check_guidance()
        self._check_heads()

    @staticmethod
    def _known(value: dict | None, defaults: dict, field: str) -> dict:
        """A copy of a dict setting whose keys are all known (the error names the field and the unknown keys)."""
        value = dict(value or {})
        unknown = set(value) - set(defaults)
        if unknown:
            raise ValueError(f"MergeBridgeConfig.{field}: unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
        return value

    @classmethod
    def _heads(cls, value: dict | None) -> dict:
        value = cls._known(value, DEFAULT_HEADS, "semantic_heads")
        heads: dict[str, Any] = {}
        for key, default in DEFAULT_HEADS.items():
            if key in HEAD_NAMES:
                heads[key] = {**default, **(value.get(key) or {})}
                if not isinstance(heads[key]["enabled"], bool):
                    raise ValueError(f"MergeBridgeConfig.semantic_heads.{key}.enabled must be a bool, "
                                     f"got {heads[key]['enabled']!r}")
            else:
                heads[key] = value.get(key, default)
                if not isinstance(heads[key], int) or isinstance(heads[key], bool) or heads[key] < 0:
                    raise ValueError(f"MergeBridgeConfig.semantic_heads.{key} must be an int >= 0, got {heads[key]!r}")
        for head, size in (("object_class", "num_classes"), ("attribute", "num_attributes"),
                           ("region_feature", "teacher_size")):
            if heads[head]["enabled"] and heads[size] < 1:
                raise ValueError(f"MergeBridgeConfig.semantic_heads.{head} is enabled but {size}={heads[size]}")
        if heads["region_feature"]["loss"] not in ("smooth_l1", "cosine"):
            raise ValueError("MergeBridgeConfig.semantic_heads.region_feature.loss must be 'smooth_l1' or 'cosine', "
                             f"got {heads['region_feature']['loss']!r}")
        return heads

    @classmethod
    def _detector(cls, value: dict | None) -> dict:
        d = {**DEFAULT_DETECTOR, **cls._known(value, DEFAULT_DETECTOR, "patch_detector")}
        if not isinstance(d["enabled"], bool):
            raise ValueError(f"MergeBridgeConfig.patch_detector.enabled must be a bool, got {d['enabled']!r}")
        ratio = d["keep_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"MergeBridgeConfig.patch_detector.keep_ratio must be in (0, 1], got {ratio!r}")
        size = d["hidden_size"]
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"MergeBridgeConfig.patch_detector.hidden_size must be None or an int >= 1, got {size!r}")
        if d["fuse_weights"] not in FUSE_WEIGHTS:
            raise ValueError(f"MergeBridgeConfig.patch_detector.fuse_weights must be one of {FUSE_WEIGHTS}, "
                             f"got {d['fuse_weights']!r}")
        weight = d["pta_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"MergeBridgeConfig.patch_detector.pta_weight must be a number >= 0, got {weight!r}")
        return d

    def _check_detector(self) -> None:
        """The detector needs CLS (its captioning fallback) and the unmerged patch grid (PTA's labels)."""
        if not self.patch_detector["enabled"]:
            return
        if VISION_LEADING_TOKENS[self.vision_config.model_type] != 1:
            raise ValueError(
                f"MergeBridgeConfig: patch_detector with vision_config.model_type={self.vision_config.model_type!r}: "
                "the detector's text-agnostic fallback (captioning) scores patches by their cosine with CLS, and "
                "this tower has no CLS token"
            )
        if self.num_feature_tokens != self.num_vision_tokens:
            raise ValueError(
                f"MergeBridgeConfig: patch_detector with vision_merging r={self.vision_merging['r']}: PTA's per-patch "
                f"labels need the unmerged patch grid at vision_feature_layer={self.vision_feature_layer}; merge "
                "only after it, or in the bridge"
            )

    @property
    def detector_enabled(self) -> bool:
        """Whether the text-aware patch detector prunes the bridge's input (and PTA can train it)."""
        return self.patch_detector["enabled"]

    @property
    def reads_prompt_text(self) -> bool:
        """Whether the model embeds the prompt's text for its images (text-guided merging or the patch detector)."""
        return self.text_guided or self.detector_enabled

    @property
    def semantic_heads_enabled(self) -> bool:
        """Whether any semantic head is on (the model then builds them and adds their losses)."""
        return any(self.semantic_heads[name]["enabled"] for name in HEAD_NAMES)

    def _check_heads(self) -> None:
        """Combinations the heads cannot train in fail here, naming both settings."""
        if not self.semantic_heads_enabled:
            return
        enabled = [name for name in HEAD_NAMES if self.semantic_heads[name]["enabled"]]
        if self.freeze_vision:
            raise ValueError(
                f"MergeBridgeConfig: semantic_heads ({', '.join(enabled)}) with freeze_vision=True: the heads train "
                "the tower's patch tokens, so the tower must be trainable (set freeze_vision=False)"
            )
        if self.num_feature_tokens != self.num_vision_tokens:
            raise ValueError(
                f"MergeBridgeConfig: semantic_heads ({', '.join(enabled)}) with vision_merging r="
                f"{self.vision_merging['r']}: the heads' per-patch targets need the unmerged patch grid at "
                f"vision_feature_layer={self.vision_feature_layer}; merge only after it, or in the bridge"
            )

    def _check_guidance(self) -> None:
        """Text-guided merging must leave every merging block its r: checked per stack against its token count."""
        stacks = (("vision_merging", self.vision_merging_config, self.num_vision_tokens,
                   self.vision_config.num_hidden_layers),
                  ("bridge_merging", self.bridge_merging_config, self.num_bridge_input_tokens,
                   self.bridge_config.num_hidden_layers))
        for field, merging, tokens, layers in stacks:
            try:
                merging.check_protect_relevant(tokens, layers)
            except ValueError as err:
                raise ValueError(f"MergeBridgeConfig.{field}: {err}") from None

    def _check_vision_features(self) -> None:
        layers, layer = self.vision_config.num_hidden_layers, self.vision_feature_layer
        if not isinstance(layer, int) or isinstance(layer, bool) or not (1 <= layer <= layers or -layers <= layer <= -1):
            raise ValueError(
                f"MergeBridgeConfig.vision_feature_layer={layer!r}: must be an int in 1..{layers} or -{layers}..-1 "
                f"(the tower has {layers} layers)"
            )
        if self.vision_feature_norm and self.vision_feature_layer_index != layers - 1:
            raise ValueError(
                f"MergeBridgeConfig.vision_feature_norm=True with vision_feature_layer={layer}: the tower's final norm "
                "applies to its last layer only"
            )

    @staticmethod
    def _merging(value: dict | TokenMergingConfig | None, default: dict, leading: int, field: str) -> dict:
        if isinstance(value, TokenMergingConfig):
            value = value.to_dict()
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"MergeBridgeConfig.{field} must be a dict or TokenMergingConfig, got {value!r}")
        merged = {**default, "protected": leading, **(value or {})}
        return TokenMergingConfig.from_dict(merged).to_dict()

    @property
    def bridge_merging_config(self) -> TokenMergingConfig:
        return TokenMergingConfig.from_dict(self.bridge_merging)

    @property
    def vision_merging_config(self) -> TokenMergingConfig:
        return TokenMergingConfig.from_dict(self.vision_merging)

    @property
    def vision_feature_layer_index(self) -> int:
        """0-based index of the tower layer whose output the bridge reads."""
        layer = self.vision_feature_layer
        return layer - 1 if layer > 0 else self.vision_config.num_hidden_layers + layer

    @property
    def vision_merges_tokens(self) -> bool:
        """Whether the tower itself merges tokens in any layer."""
        return any(self.vision_merging_config.schedule(self.vision_config.num_hidden_layers))

    @property
    def bridge_text_guided(self) -> bool:
        """Whether the bridge merges with text guidance (`protect_relevant` > 0 and some r > 0)."""
        merging = self.bridge_merging_config
        return merging.protect_relevant > 0 and any(merging.schedule(self.bridge_config.num_hidden_layers))

    @property
    def vision_text_guided(self) -> bool:
        """Whether the tower merges with text guidance (`protect_relevant` > 0 and some r > 0)."""
        return self.vision_merging_config.protect_relevant > 0 and self.vision_merges_tokens

    @property
    def text_guided(self) -> bool:
        """Whether any merging reads the prompt: the model then embeds the prompt's text for relevance."""
        return self.bridge_text_guided or self.vision_text_guided

    @property
    def num_vision_tokens(self) -> int:
        """Tokens entering the vision tower (patches + CLS) at the configured image size."""
        return vision_num_tokens(self.vision_config)

    @property
    def num_feature_tokens(self) -> int:
        """Tokens of the tower layer the bridge reads (`vision_feature_layer`, after the tower's own merging)."""
        counts = self.vision_merging_config.token_counts(self.num_vision_tokens, self.vision_config.num_hidden_layers)
        return counts[self.vision_feature_layer_index] if counts else self.num_vision_tokens

    @property
    def num_kept_patches(self) -> int:
        """K: the patch tokens the detector keeps, round(keep_ratio * P) of the feature layer's P (all without it)."""
        patches = self.num_feature_tokens - VISION_LEADING_TOKENS[self.vision_config.model_type]
        if not self.detector_enabled:
            return patches
        return max(1, min(patches, round(self.patch_detector["keep_ratio"] * patches)))

    @property
    def num_bridge_input_tokens(self) -> int:
        """Tokens the bridge reads: the feature layer's, or with the detector CLS + K kept + 1 fused (none if K = P)."""
        if not self.detector_enabled:
            return self.num_feature_tokens
        leading = VISION_LEADING_TOKENS[self.vision_config.model_type]
        patches = self.num_feature_tokens - leading
        return leading + self.num_kept_patches + (1 if self.num_kept_patches < patches else 0)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens the LLM receives per image: what the processor expands one `<image>` into."""
        counts = self.bridge_merging_config.token_counts(
            self.num_bridge_input_tokens, self.bridge_config.num_hidden_layers
        )
        return counts[-1] if counts else self.num_bridge_input_tokens


__all__ = ["MergeBridgeConfig", "vision_num_tokens", "HEAD_NAMES"]
