"""PatchAlign configuration: end-to-end VLP with COPA's text-aware patch detector and semantic visual heads."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, BertConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .token_merging import TokenMergingConfig
from .transformers_compat import check_transformers_version

check_transformers_version()  # one clear line on an unsupported release, before anything deeper fails

__all__ = ["PatchAlignConfig", "PATCH_ALIGN_VISION_TYPES", "FUSE_WEIGHTS", "SELECTIONS", "MERGING_BLOCKS"]

# Vision towers with a CLS token at index 0 (the detector, ITC and the agnostic scores need it).
PATCH_ALIGN_VISION_TYPES = ("vit", "clip_vision_model", "dinov2")
DEFAULT_VISION = dict(model_type="vit", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, image_size=224, patch_size=16)
DEFAULT_DETECTOR = dict(enabled=True, layer=6, keep_ratio=0.5, hidden_size=None, prop_attn=True,
                        fuse_weights="logits", itm_text_aware=False, selection="detector")
FUSE_WEIGHTS = ("logits", "scores")  # what the text-aware fused token's softmax weights read
SELECTIONS = ("detector", "cls_cosine", "random")  # what ranks the text-aware branch's patches
MERGING_BLOCKS = ("all", "before_detector", "after_detector")  # where the tower's token merging may act
HEAD_NAMES = ("object_class", "attribute", "region_feature")
DEFAULT_HEADS = dict(
    object_class=dict(enabled=False, weight=1.0),
    attribute=dict(enabled=False, weight=1.0),
    region_feature=dict(enabled=False, weight=1.0, loss="smooth_l1"),
    layer=None,
)
LOSS_NAMES = ("itc", "itm", "mlm", "lm", "pta", *HEAD_NAMES)


def _sub_config(value: dict | PretrainedConfig | None, default: dict, field: str) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"PatchAlignConfig.{field} must be a dict or a PretrainedConfig, got {type(value).__name__}")
    value = dict(default if value is None else value)
    model_type = value.pop("model_type", default.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"PatchAlignConfig.{field}: unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type](**value)


class PatchAlignConfig(PretrainedConfig):
    r"""
    Configuration of the PatchAlign models: a ViT (pixels in), a BERT text encoder, BERT fusion layers that
    cross-attend to image tokens (ITM, MLM), and a BERT decoder (causal self-attention + cross-attention + LM
    head) for captioning and generative VQA. Inside the ViT, COPA's text-aware patch detector keeps the
    top `keep_ratio` of the patches after block `layer`; three optional semantic heads supervise patch tokens.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*): one of `vit`, `clip_vision_model`, `dinov2`
            (a CLS token is required). Defaults to ViT-B/16 at 224 px.
        text_config (`dict` or `BertConfig`, *optional*): the BERT text encoder (defaults to BERT-base, 6 layers).
        num_fusion_layers (`int`, defaults to 6): BERT layers with cross-attention to image tokens.
        num_decoder_layers (`int`, defaults to 6): BERT layers with causal self-attention + cross-attention.
        embed_dim (`int`, defaults to 256): ITC projection size.
        itc_temperature (`float`, defaults to 0.07): initial ITC temperature (learnable, clamped to [0.001, 0.5]).
        mlm_probability (`float`, defaults to 0.15): share of text tokens masked for MLM.
        patch_detector (`dict`, *optional*): `enabled` (True), `layer` (6: prune after the 6th block, 1-based,
            within the tower's depth), `keep_ratio` (0.5, in (0, 1]), `hidden_size` (the MLP width; None = the
            vision width), `prop_attn` (True: in the blocks after the detector the fused token gets ToMe's
            proportional attention, log(#fused patches) on its attention logits, so the background keeps its weight;
            False: one plain token. The tiny ITM overfitting test converges with True and not with False),
            `fuse_weights` ("logits": the text-aware fused token weights the dropped patches by the softmax of the
            detector's logits, i.e. in proportion to the odds s_i / (1 - s_i) of its scores; "scores": by the
            softmax of the sigmoid scores s_i themselves, which lie in (0, 1), so no weight exceeds e times
            another and the fuse is nearly a plain mean; the text-agnostic branch always weights by its cosine
            scores), `itm_text_aware` (False: ITM and retrieval's ITM re-ranking read the text-agnostic image
            tokens; True: each (image, text) pair's image is pruned by the detector with that text's [CLS], as
            MLM and VQA are; costs one more tower pass per ITM batch), `selection` ("detector": the text-aware
            branch keeps the patches the detector ranks highest; "cls_cosine": the text-agnostic CLS-cosine scores
            rank them instead; "random": uniform scores from torch's global generator, a control. The latter two are
            ablations: the detector still scores every patch, so PTA trains it and `patch_scores` report it, but it
            chooses nothing and the fused token weights the dropped patches by the softmax of the ranking scores).
        semantic_heads (`dict`, *optional*): `object_class`, `attribute`, `region_feature`, each
            `{"enabled": bool, "weight": float}` (`region_feature` also `"loss": "smooth_l1" | "cosine"`), and
            `layer` (1-based block whose output the heads read; None = the detector's block, or the last block
            without a detector; must not lie after the detector's block, where the patch grid is pruned; or
            "final": the tower's last block, where with the detector on the heads read the K patches the
            text-agnostic branch kept and their targets are taken at those patches' grid positions).
        vision_merging (`dict`, *optional*): [`TokenMergingConfig`] of token merging inside the tower (ToMe; defaults
            to r=0: no merging, no change to any output). `protected` must stay 1 (CLS); `prop_attn` defaults to
            `patch_detector.prop_attn` and, with the detector on, must agree with it (one proportional-attention switch
            for merged and fused tokens); text-guided merging (`protect_relevant`) is not available here (the
            detector is the tower's text-aware selection).
        vision_merging_blocks (`str`, defaults to `"all"`): which blocks of the schedule merge: `"all"`,
            `"before_detector"` (blocks 1..`patch_detector.layer`, the detector's own block included: its merge runs
            between its attention and MLP, before the detector scores its output) or `"after_detector"` (the blocks
            after it, on CLS + K + fused tokens); the schedule's r in the other blocks is set to 0. The last two
            need the detector. Merging before the detector: the detector scores merged tokens, K =
            round(keep_ratio * tokens entering it), and PTA's per-patch labels follow the groups (a merged token is
            relevant when any of its patches is, as a box marks any patch it overlaps). The semantic heads need the
            unmerged grid: no merging up to the block they read. `num_image_tokens` predicts the tower's output.
        object_classes (`list[str]`): object-class vocabulary (background is added as the last class).
        attributes (`list[str]`): attribute vocabulary.
        teacher_size (`int`, defaults to 0): size of the teacher region features.
        loss_weights (`dict`, *optional*): weights of `itc`, `itm`, `mlm`, `lm`, `pta` (1.0 each by default); the
            heads' weights come from `semantic_heads`.
        cls_token_id / sep_token_id / mask_token_id (`int`, *optional*): the decoder's start token, its end token,
            and the MLM mask token (the processor builder sets them from the tokenizer). Unset, each comes from the
            text config (its own `cls_token_id` / `sep_token_id` / `mask_token_id`, else `bos_token_id` /
            `eos_token_id` for [CLS] / [SEP]), else BERT's 101 / 102 / 103 when the vocabulary holds them, else None
            (the paths that need the token then say so). They also set the generation defaults: `bos_token_id` =
            [CLS], `eos_token_id` = [SEP], `pad_token_id` = the text config's.

    Example:

    ```python
    >>> from leanvlp.modeling.configuration_patch_align import PatchAlignConfig
    >>> from leanvlp.modeling.modeling_patch_align import PatchAlignForPreTraining
    >>> config = PatchAlignConfig(
    ...     vision_config=dict(model_type="vit", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
    ...                        intermediate_size=64, image_size=32, patch_size=8),
    ...     text_config=dict(model_type="bert", vocab_size=100, hidden_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, intermediate_size=64),
    ...     cls_token_id=1, sep_token_id=2, mask_token_id=3,
    ...     num_fusion_layers=1, num_decoder_layers=1, embed_dim=16,
    ...     patch_detector=dict(layer=2, keep_ratio=0.5),
    ... )
    >>> model = PatchAlignForPreTraining(config)
    >>> config.num_kept_patches
    8

    Token merging in the tower after the detector (CLS + 8 kept + 1 fused = 10 tokens, then r=2 in blocks 3, 4):

    >>> merged = PatchAlignConfig(**{**config.to_dict(), "vision_merging": {"r": 2},
    ...                              "vision_merging_blocks": "after_detector"})
    >>> merged.vision_token_counts
    [17, 10, 8, 6]
    >>> merged.num_image_tokens
    6

    ```
    """

    model_type = "patch_align"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        num_fusion_layers: int = 6,
        num_decoder_layers: int = 6,
        embed_dim: int = 256,
        itc_temperature: float = 0.07,
        mlm_probability: float = 0.15,
        patch_detector: dict | None = None,
        semantic_heads: dict | None = None,
        object_classes: list[str] | None = None,
        attributes: list[str] | None = None,
        teacher_size: int = 0,
        loss_weights: dict | None = None,
        vision_merging: dict | TokenMergingConfig | None = None,
        vision_merging_blocks: str = "all",
        cls_token_id: int | None = None,
        sep_token_id: int | None = None,
        mask_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vision_config = _sub_config(vision_config, DEFAULT_VISION, "vision_config")
        if self.vision_config.model_type not in PATCH_ALIGN_VISION_TYPES:
            raise ValueError(
                f"PatchAlignConfig.vision_config: model_type {self.vision_config.model_type!r} is not supported; "
                f"use one of {PATCH_ALIGN_VISION_TYPES}"
            )
        self.text_config = _sub_config(text_config, dict(model_type="bert", num_hidden_layers=6), "text_config")
        if self.text_config.model_type != "bert":
            raise ValueError(f"PatchAlignConfig.text_config: model_type must be 'bert', got {self.text_config.model_type!r}")
        for name, value in (("num_fusion_layers", num_fusion_layers), ("num_decoder_layers", num_decoder_layers),
                            ("embed_dim", embed_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PatchAlignConfig.{name} must be an int >= 1, got {value!r}")
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"PatchAlignConfig.mlm_probability must be in (0, 1), got {mlm_probability!r}")
        if not 0.0 < itc_temperature <= 0.5:
            raise ValueError(f"PatchAlignConfig.itc_temperature must be in (0, 0.5], got {itc_temperature!r}")
        self.num_fusion_layers = num_fusion_layers
        self.num_decoder_layers = num_decoder_layers
        self.embed_dim = embed_dim
        self.itc_temperature = itc_temperature
        self.mlm_probability = mlm_probability
        self.object_classes = list(object_classes or [])
        self.attributes = list(attributes or [])
        self.teacher_size = teacher_size
        self.cls_token_id = self._special_id("cls_token_id", cls_token_id, "bos_token_id", 101)
        self.sep_token_id = self._special_id("sep_token_id", sep_token_id, "eos_token_id", 102)
        self.mask_token_id = self._special_id("mask_token_id", mask_token_id, None, 103)
        # generate()'s defaults (GenerationConfig.from_model_config reads these top-level ids first); derived, so a
        # saved value is not read back
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.pop(name, None)
        self.bos_token_id, self.eos_token_id = self.cls_token_id, self.sep_token_id
        self.pad_token_id = self.text_config.pad_token_id
        self.patch_detector = self._detector(patch_detector)
        self.semantic_heads = self._heads(semantic_heads)
        unknown = set(loss_weights or {}) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"PatchAlignConfig.loss_weights: unknown losses {sorted(unknown)}; known: {LOSS_NAMES}")
        self.loss_weights = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "lm": 1.0, "pta": 1.0, **(loss_weights or {})}
        for head in HEAD_NAMES:  # the heads' weights live in their section; loss_weights may override
            if head in (loss_weights or {}):
                self.semantic_heads[head]["weight"] = float(self.loss_weights[head])
            self.loss_weights[head] = self.semantic_heads[head]["weight"]
        self.vision_merging = self._merging(vision_merging)
        self.vision_merging_blocks = vision_merging_blocks
        self._check_merging()
        super().__init__(**kwargs)

    def _special_id(self, name: str, value: int | None, generic: str | None, bert_default: int) -> int | None:
        """An explicit id, else the text config's (same name, then its generic bos / eos), else BERT's if it fits."""
        vocab = self.text_config.vocab_size
        if value is None:
            for source in (name, generic):
                value = getattr(self.text_config, source, None) if source else None
                if value is not None:
                    break
            else:
                value = bert_default if bert_default < vocab else None
        if value is not None and (not isinstance(value, int) or not 0 <= value < vocab):
            raise ValueError(f"PatchAlignConfig.{name} must be a token id in [0, {vocab}), got {value!r}")
        return value

    def _detector(self, value: dict | None) -> dict:
        unknown = set(value or {}) - set(DEFAULT_DETECTOR)
        if unknown:
            raise ValueError(f"PatchAlignConfig.patch_detector: unknown keys {sorted(unknown)}")
        d = {**DEFAULT_DETECTOR, **(value or {})}
        if d["fuse_weights"] not in FUSE_WEIGHTS:
            raise ValueError(
                f"PatchAlignConfig.patch_detector.fuse_weights must be one of {FUSE_WEIGHTS}, got {d['fuse_weights']!r}"
            )
        if d["selection"] not in SELECTIONS:
            raise ValueError(
                f"PatchAlignConfig.patch_detector.selection must be one of {SELECTIONS}, got {d['selection']!r}"
            )
        if not isinstance(d["itm_text_aware"], bool):
            raise ValueError(
                f"PatchAlignConfig.patch_detector.itm_text_aware must be a bool, got {d['itm_text_aware']!r}"
            )
        if not d["enabled"]:
            return d
        depth = self.vision_config.num_hidden_layers
        if not isinstance(d["layer"], int) or not 1 <= d["layer"] <= depth:
            raise ValueError(
                f"PatchAlignConfig.patch_detector.layer must be an int in [1, {depth}] (the tower's depth), "
                f"got {d['layer']!r}"
            )
        if not isinstance(d["keep_ratio"], (int, float)) or not 0.0 < d["keep_ratio"] <= 1.0:
            raise ValueError(f"PatchAlignConfig.patch_detector.keep_ratio must be in (0, 1], got {d['keep_ratio']!r}")
        return d

    def _heads(self, value: dict | None) -> dict:
        value = value or {}
        unknown = set(value) - set(DEFAULT_HEADS)
        if unknown:
            raise ValueError(f"PatchAlignConfig.semantic_heads: unknown keys {sorted(unknown)}")
        heads: dict[str, Any] = {"layer": value.get("layer")}
        for name in HEAD_NAMES:
            heads[name] = {**DEFAULT_HEADS[name], **(value.get(name) or {})}
        if heads["object_class"]["enabled"] and not self.object_classes:
            raise ValueError("PatchAlignConfig.semantic_heads.object_class is enabled but object_classes is empty")
        if heads["attribute"]["enabled"] and not self.attributes:
            raise ValueError("PatchAlignConfig.semantic_heads.attribute is enabled but attributes is empty")
        if heads["region_feature"]["enabled"] and (not isinstance(self.teacher_size, int) or self.teacher_size < 1):
            raise ValueError(
                f"PatchAlignConfig.semantic_heads.region_feature is enabled but teacher_size={self.teacher_size!r}"
            )
        if heads["region_feature"]["loss"] not in ("smooth_l1", "cosine"):
            raise ValueError(
                f"PatchAlignConfig.semantic_heads.region_feature.loss must be 'smooth_l1' or 'cosine', "
                f"got {heads['region_feature']['loss']!r}"
            )
        depth = self.vision_config.num_hidden_layers
        last_full = self.patch_detector["layer"] if self.patch_detector["enabled"] else depth
        layer = heads["layer"]
        if layer not in (None, "final") and (not isinstance(layer, int) or not 1 <= layer <= last_full):
            raise ValueError(
                f"PatchAlignConfig.semantic_heads.layer must be an int in [1, {last_full}] (blocks before the "
                f"patch grid is pruned) or 'final' (the tower's last block), got {layer!r}"
            )
        return heads

    def _merging(self, value: dict | TokenMergingConfig | None) -> dict:
        """The tower's merging dict; `prop_attn` defaults to the detector's (the tower has one such switch)."""
        if isinstance(value, TokenMergingConfig):
            value = value.to_dict()
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"PatchAlignConfig.vision_merging must be a dict or TokenMergingConfig, got {value!r}")
        defaults = {"r": 0, "protected": 1, "prop_attn": self.patch_detector["prop_attn"]}
        try:
            merging = TokenMergingConfig.from_dict({**defaults, **(value or {})})
        except ValueError as err:
            raise ValueError(f"PatchAlignConfig.vision_merging: {err}") from None
        if merging.protected != 1:
            raise ValueError(f"PatchAlignConfig.vision_merging.protected must be 1 (the CLS token, which ITC and the "
                             f"detector read at index 0), got {merging.protected}")
        if merging.protect_relevant:
            raise ValueError(f"PatchAlignConfig.vision_merging.protect_relevant={merging.protect_relevant}: "
                             "text-guided merging is not available in PatchAlign's tower; its text-aware selection "
                             "is patch_detector")
        return merging.to_dict()

    def _check_merging(self) -> None:
        """Where the tower merges, and the combinations that cannot work, each error naming both settings."""
        blocks, det, depth = self.vision_merging_blocks, self.patch_detector, self.vision_config.num_hidden_layers
        if blocks not in MERGING_BLOCKS:
            raise ValueError(f"PatchAlignConfig.vision_merging_blocks must be one of {MERGING_BLOCKS}, got {blocks!r}")
        try:
            TokenMergingConfig.from_dict(self.vision_merging).schedule(depth)
        except ValueError as err:
            raise ValueError(f"PatchAlignConfig.vision_merging: {err}") from None
        if blocks != "all" and not det["enabled"]:
            raise ValueError(f"PatchAlignConfig: vision_merging_blocks={blocks!r} with patch_detector.enabled=False: "
                             "there is no detector block to merge before or after; use 'all'")
        schedule = self.vision_merging_schedule
        if not any(schedule):
            return
        merging = TokenMergingConfig.from_dict(self.vision_merging)
        if det["enabled"] and merging.use_prop_attn != det["prop_attn"]:
            raise ValueError(
                f"PatchAlignConfig: vision_merging (mode={merging.mode!r}, prop_attn={merging.prop_attn}) with "
                f"patch_detector.prop_attn={det['prop_attn']}: the tower has one proportional-attention switch for "
                "merged and fused tokens; make them agree (proportional attention needs mode 'size_weighted')"
            )
        enabled = [name for name in HEAD_NAMES if self.semantic_heads[name]["enabled"]]
        if enabled and any(schedule[: self.heads_layer]):
            raise ValueError(
                f"PatchAlignConfig: semantic_heads ({', '.join(enabled)}) reading block {self.heads_layer} with "
                f"vision_merging r={self.vision_merging['r']!r} (vision_merging_blocks={blocks!r}) merging in blocks "
                f"1..{self.heads_layer}: the heads' per-patch targets need the unmerged patch grid; merge only after "
                "the heads' block (e.g. vision_merging_blocks='after_detector' with semantic_heads.layer <= the "
                "detector's)"
            )

    @property
    def vision_merging_schedule(self) -> list[int]:
        """r per tower block as the tower runs it: the schedule, zero outside `vision_merging_blocks`."""
        depth = self.vision_config.num_hidden_layers
        schedule = TokenMergingConfig.from_dict(self.vision_merging).schedule(depth)
        layer = self.patch_detector["layer"]
        if self.vision_merging_blocks == "before_detector":
            return [r if i < layer else 0 for i, r in enumerate(schedule)]
        if self.vision_merging_blocks == "after_detector":
            return [r if i >= layer else 0 for i, r in enumerate(schedule)]
        return schedule

    @property
    def tower_merging(self) -> dict:
        """The tower's `TokenMergingConfig` dict: r = 0 (only the detector's prop_attn) when nothing merges."""
        schedule = self.vision_merging_schedule
        if not any(schedule):
            return {"r": 0, "protected": 1, "prop_attn": self.patch_detector["prop_attn"]}
        return {**self.vision_merging, "r": schedule}

    @property
    def vision_token_counts(self) -> list[int]:
        """Tokens after each tower block (CLS included), merging and the detector's pruning both counted."""
        det, n, counts = self.patch_detector, 1 + self.num_patches, []
        for i, r in enumerate(self.vision_merging_schedule):
            n -= min(r, (n - 1) // 2)
            if det["enabled"] and i == det["layer"] - 1:  # n - 1 == num_detector_tokens here
                n = 1 + self.num_kept_patches + (1 if self.num_kept_patches < n - 1 else 0)  # CLS + kept + fused
            counts.append(n)
        return counts

    @property
    def num_image_tokens(self) -> int:
        """Image tokens out of the tower (CLS included): what ITC, fusion and the decoder read."""
        return self.vision_token_counts[-1]

    @property
    def merges_before_detector(self) -> bool:
        """Whether the detector scores merged tokens (PTA's patch labels then follow the merged groups)."""
        det = self.patch_detector
        return det["enabled"] and any(self.vision_merging_schedule[: det["layer"]])

    @property
    def heads_layer(self) -> int:
        """1-based block whose output the semantic heads read (past the detector's block: its kept patches)."""
        if self.semantic_heads["layer"] == "final":
            return self.vision_config.num_hidden_layers
        if self.semantic_heads["layer"] is not None:
            return self.semantic_heads["layer"]
        return self.patch_detector["layer"] if self.patch_detector["enabled"] else self.vision_config.num_hidden_layers

    @property
    def num_patches(self) -> int:
        size, patch = self.vision_config.image_size, self.vision_config.patch_size
        size = size if isinstance(size, int) else size[0]
        patch = patch if isinstance(patch, int) else patch[0]
        return (size // patch) ** 2

    @property
    def num_detector_tokens(self) -> int:
        """Tokens (CLS excluded) the detector scores: the P patches, or fewer when the tower merges before it."""
        det, n = self.patch_detector, self.num_patches
        if not det["enabled"]:
            return n
        for r in self.vision_merging_schedule[: det["layer"]]:
            n -= min(r, n // 2)  # (n + 1 - protected) // 2 with CLS protected
        return n

    @property
    def num_kept_patches(self) -> int:
        """K = round(keep_ratio * P) of the P tokens the detector scores (all P without a detector)."""
        n = self.num_detector_tokens
        if not self.patch_detector["enabled"]:
            return n
        return max(1, min(n, round(self.patch_detector["keep_ratio"] * n)))

    def cross_layer_config(self) -> BertConfig:
        """BertConfig of a fusion (bidirectional, explicit mask) or decoder (causal) layer with cross-attention.

        transformers' BertLayer only builds cross-attention with `is_decoder=True`; fusion layers always get
        an explicit bidirectional mask, so they never run causally. The model points the layers' attention modules
        at `text_config` afterwards, so they follow its attention implementation.
        """
        return BertConfig(**{**self.text_config.to_dict(), "is_decoder": True, "add_cross_attention": True})
