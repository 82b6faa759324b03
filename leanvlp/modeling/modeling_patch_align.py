"""PatchAlign: end-to-end VLP from pixels with COPA's text-aware patch pruning and semantic visual heads.

Architecture (mPLUG/ALBEF-shaped, our reading of COPA, methods.md §3):
  ViT (pixels) --[after block k: keep the top-K patches, fuse the rest]--> image tokens
  BERT text encoder --> text tokens; its [CLS] drives the text-aware detector
  fusion: BERT layers, self-attention over text + cross-attention to image tokens (ITM, MLM, VQA)
  decoder: BERT layers, causal self-attention + cross-attention, LM head (captions, answers)

Which image tokens each path sees (the ITC image embedding must not depend on the paired text):
  - ITC, ITM, captioning LM and retrieval: the text-agnostic branch (patches scored by their cosine
    similarity with CLS at block k). ITM and retrieval's ITM re-ranking use it by default, because a
    hard-negative pair (image j, text i) needs image j re-pruned by text i; with
    `patch_detector.itm_text_aware` they do exactly that (`encode_image_pairs`: one more tower pass,
    blocks 1..k on the images, the rest on one row per (image, text) pair).
  - MLM and the PTA loss: the text-aware branch, scored with the [CLS] of the *masked* caption (so
    the masked words cannot leak into the patch choice). VQA: text-aware with the question's [CLS].
  Blocks 1..k run once; both branches then run the remaining blocks stacked on the batch axis.
  `patch_detector.selection` ranks the text-aware branch's patches by CLS-cosine or random scores instead of the
  detector's (ablations; the detector still scores them for PTA).
With the detector disabled every path sees the full, unpruned tower output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import wraps
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    AutoModel,
    BertModel,
    DynamicCache,
    EncoderDecoderCache,
    GenerationMixin,
    PreTrainedModel,
    ViTModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.models.bert.modeling_bert import BertLayer, BertPredictionHeadTransform
from transformers.utils import ModelOutput, logging

from .configuration_patch_align import PatchAlignConfig
from .patch_selection import (
    DualPatchSelectionHook,
    PatchSelectionHook,
    TextAwarePatchDetector,
    group_patch_labels,
    pta_loss,
)
from .semantic_heads import IGNORE_INDEX, SemanticHeads
from .token_merging import BlockHook, MergeState, padding_bias
from .transformers_compat import CACHE_NAME, get_cache
from .vision_tower import TokenMergingVisionTower

logger = logging.get_logger(__name__)

__all__ = [
    "PatchAlignPreTrainedModel",
    "PatchAlignModel",
    "PatchAlignForPreTraining",
    "PatchAlignForImageTextRetrieval",
    "PatchAlignForConditionalGeneration",
    "PatchAlignForQuestionAnswering",
    "PatchAlignModelOutput",
    "PatchAlignForPreTrainingOutput",
    "PatchAlignRetrievalOutput",
    "PatchAlignGenerationOutput",
    "mask_tokens",
    "sample_hard_negatives",
]


# ----------------------------------------------------------------------------- outputs


@dataclass
class PatchAlignModelOutput(ModelOutput):
    """image_embeds: text-agnostic image tokens (B, N', Cv); fused: text attending to text-aware tokens.

    With output_hidden_states / output_attentions (eager attention only), per part: the vision tower's
    text-agnostic branch (the embeddings then each block; K+2 tokens after the detector), the text encoder,
    the fusion layers (and their cross-attention to the text-aware image tokens).
    """

    image_embeds: Tensor | None = None
    text_embeds: Tensor | None = None  # (B, T, Ct)
    image_feat: Tensor | None = None  # (B, D) L2-normalised ITC embedding
    text_feat: Tensor | None = None  # (B, D)
    fused_embeds: Tensor | None = None  # (B, T, Ct)
    patch_scores: Tensor | None = None  # (B, P) text-aware detector scores
    kept_patches: Tensor | None = None  # (B, K) indices of the kept patches, spatial order
    vision_hidden_states: tuple[Tensor, ...] | None = None
    vision_attentions: tuple[Tensor, ...] | None = None
    text_hidden_states: tuple[Tensor, ...] | None = None
    text_attentions: tuple[Tensor, ...] | None = None
    fusion_hidden_states: tuple[Tensor, ...] | None = None
    fusion_attentions: tuple[Tensor, ...] | None = None
    fusion_cross_attentions: tuple[Tensor, ...] | None = None


@dataclass
class PatchAlignForPreTrainingOutput(ModelOutput):
    """`loss` = sum of config.loss_weights[name] * loss_name over the terms that were computed."""

    loss: Tensor | None = None
    loss_itc: Tensor | None = None
    loss_itm: Tensor | None = None
    loss_mlm: Tensor | None = None
    loss_lm: Tensor | None = None
    loss_pta: Tensor | None = None
    loss_object_class: Tensor | None = None
    loss_attribute: Tensor | None = None
    loss_region_feature: Tensor | None = None
    logits_per_image: Tensor | None = None  # (B, B_all) ITC
    itm_logits: Tensor | None = None  # (3B, 2): positives, (image, hard text), (hard image, text)
    itm_negative_texts: Tensor | None = None  # (B,) text index paired with image i as a negative
    itm_negative_images: Tensor | None = None  # (B,) image index paired with text i as a negative
    patch_scores: Tensor | None = None  # (B, P)
    kept_patches: Tensor | None = None  # (B, K)
    vision_hidden_states: tuple[Tensor, ...] | None = None  # the text-agnostic branch, as PatchAlignModelOutput
    vision_attentions: tuple[Tensor, ...] | None = None
    text_hidden_states: tuple[Tensor, ...] | None = None  # the unmasked caption
    text_attentions: tuple[Tensor, ...] | None = None


@dataclass
class PatchAlignRetrievalOutput(ModelOutput):
    """itc_scores (B_img, B_txt); i2t/t2i: ITM match probability on each row's ITC top-k, -inf elsewhere."""

    loss: Tensor | None = None
    itc_scores: Tensor | None = None
    i2t_scores: Tensor | None = None
    t2i_scores: Tensor | None = None


@dataclass
class PatchAlignGenerationOutput(CausalLMOutputWithCrossAttentions):
    """transformers' causal-LM output (loss, logits (B, T, V), the decoder's cache, hidden_states, attentions,
    cross_attentions of the decoder) plus the memory it cross-attends to, so generate() encodes the image once."""

    encoder_hidden_states: Tensor | None = None  # (B, M, Ct)


# ----------------------------------------------------------------------------- helpers


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float,
    generator: torch.Generator | None = None,
    sample_seeds: Tensor | None = None,
    draw_length: int = 512,
) -> tuple[Tensor, Tensor]:
    """BERT masking: pick `probability` of the real, non-special tokens; 80% [MASK], 10% random, 10% kept.

    sample_seeds (B,) int64 makes each row's mask a function of its seed alone: each row draws `draw_length`
    (>= T, e.g. max_position_embeddings) values per kind on the CPU and uses the first T, so neither the
    batch's padding nor its other rows matter and a sample is masked the same way in any process or batch.
    Returns (masked input_ids, labels with IGNORE_INDEX on unpicked tokens).
    """
    dev = input_ids.device
    if sample_seeds is not None:
        if sample_seeds.shape != input_ids.shape[:1]:
            raise ValueError(f"sample_seeds must have shape ({input_ids.shape[0]},), got {tuple(sample_seeds.shape)}")
        T, L = input_ids.shape[1], max(draw_length, input_ids.shape[1])
        draws = []
        for seed in sample_seeds.tolist():
            g = torch.Generator().manual_seed(int(seed))
            draws.append((torch.rand(L, generator=g)[:T], torch.rand(L, generator=g)[:T],
                          torch.randint(vocab_size, (L,), generator=g)[:T]))
        pick_roll, roll, random_ids = (torch.stack(d).to(dev) for d in zip(*draws))  # (B, T) each
    else:
        pick_roll = torch.rand(input_ids.shape, generator=generator, device=dev)
        roll = torch.rand(input_ids.shape, generator=generator, device=dev)
        random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=dev)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=dev))
    picked = (pick_roll < probability) & candidates
    labels = input_ids.masked_fill(~picked, IGNORE_INDEX)
    masked = input_ids.masked_fill(picked & (roll < 0.8), mask_token_id)
    masked = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, labels


def sample_hard_negatives(similarity: Tensor, positives: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """For each row, a column drawn with probability softmax(similarity) among the non-positive columns.

    similarity (B, M); positives (B, M) bool marks every true pair (default: the diagonal). A row with
    no negative column raises: there is nothing to contrast with.
    """
    B, M = similarity.shape
    if positives is None:
        positives = torch.eye(B, M, dtype=torch.bool, device=similarity.device)
    if (~positives).sum(1).min() == 0:
        raise ValueError("sample_hard_negatives: a row has no negative candidate (batch of one pair?)")
    with torch.no_grad():
        weights = similarity.float().softmax(dim=1).masked_fill(positives, 0.0)
        weights = weights + (~positives).float() * 1e-12  # underflow guard: every negative stays possible
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def _gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All-gather along dim 0 keeping gradients (torch.distributed.nn); (x, 0) when not distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x, 0
    if torch.distributed.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), torch.distributed.get_rank() * x.shape[0]


def _causal_bias(mask: Tensor, query_length: int, dtype: torch.dtype) -> Tensor:
    """(B, K) 1/0 over cached + new keys -> additive causal + padding bias (B, 1, Q, K); query i is key K - Q + i."""
    K = mask.shape[1]
    keys = torch.arange(K, device=mask.device)
    causal = keys[None, :] <= keys[K - query_length:, None]  # (Q, K)
    allowed = causal[None, None] & mask[:, None, None, :].bool()
    return (~allowed).to(dtype) * torch.finfo(dtype).min


def _positions(mask: Tensor, query_length: int) -> Tensor:
    """Position ids (B, Q) of the last Q keys, counted over real tokens only: left padding shifts nothing."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - query_length:]


@dataclass
class _LayerStackOutput:
    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


def _run_cross_layers(
    layers: nn.ModuleList,
    hidden: Tensor,
    bias: Tensor,
    memory: Tensor,
    cache: EncoderDecoderCache | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> _LayerStackOutput:
    """BertLayers with cross-attention. BertLayer drops its attention maps, so forward hooks on its two attention
    modules record them (eager only: SDPA computes none, and then attentions stay None)."""
    all_hidden = [hidden] if output_hidden_states else None
    maps: dict[str, list[Tensor | None]] = {"self": [], "cross": []}
    handles = []
    if output_attentions:
        for layer in layers:
            for kind, module in (("self", layer.attention.self), ("cross", layer.crossattention.self)):
                handles.append(module.register_forward_hook(lambda _m, _a, out, kind=kind: maps[kind].append(out[1])))
    cache_kwargs = {CACHE_NAME: cache} if cache is not None else {}
    try:
        for layer in layers:
            # tensors positionally: transformers' checkpointing keeps gradients for positional inputs only
            hidden = layer(hidden, bias, memory, **cache_kwargs)
            if all_hidden is not None:
                all_hidden.append(hidden)
    finally:
        for handle in handles:
            handle.remove()
    attentions = cross = None
    if output_attentions:
        if any(m is None for m in maps["self"] + maps["cross"]):
            logger.warning_once("fusion / decoder layers: SDPA returns no attention maps; set "
                                "attn_implementation='eager' (text_config) for output_attentions=True")
        else:
            attentions, cross = tuple(maps["self"]), tuple(maps["cross"])
    return _LayerStackOutput(hidden, tuple(all_hidden) if all_hidden is not None else None, attentions, cross)


class _CaptureHook(BlockHook):
    """Records the hidden states after one block (before any pruning at that block: list it first)."""

    def __init__(self, layer_idx: int):
        self.layer_idx, self.hidden = layer_idx, None

    def after_block(self, layer_idx: int, hidden: Tensor, state: MergeState) -> tuple[Tensor, MergeState]:
        if layer_idx == self.layer_idx:
            self.hidden = hidden
        return hidden, state


class _LMHead(nn.Module):
    """BERT prediction head: dense + act + LayerNorm, then the vocabulary projection."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden))


def _build_vision_model(config) -> PreTrainedModel:
    if config.model_type == "vit":
        return ViTModel(config, add_pooling_layer=False)
    return AutoModel.from_config(config)


def _load_weights(target: nn.Module, state: dict[str, Tensor], what: str, new: tuple[str, ...] = ()) -> None:
    """Copy `state` into `target`; a pooler the target lacks is dropped, and only keys under `new` may stay unset."""
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(new)] if new else missing
    if missing or unexpected:
        raise ValueError(f"{what} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


@dataclass
class ImageEncoding:
    agnostic: Tensor  # (B, N', Cv) tokens for ITC / ITM / LM
    aware: Tensor | None  # (B, N', Cv) tokens pruned with the text, or None
    logits: Tensor | None  # (B, P) text-aware detector logits
    kept: Tensor | None  # (B, K)
    patches: Tensor | None  # (B, P, Cv) patch tokens for the semantic heads; (B, K, Cv) past the detector
    patch_index: Tensor | None = None  # (B, K) grid positions of `patches` when they are the kept ones
    hidden_states: tuple[Tensor, ...] | None = None  # the agnostic branch: embeddings, then each block
    attentions: tuple[Tensor, ...] | None = None  # the agnostic branch, eager only
    token_sources: Tensor | None = None  # (B, P', 1 + P) patches of each token the detector scored (merged before it)
    scores: Tensor | None = None  # (B, P) what ranked the text-aware branch's patches (patch_detector.selection)


# ----------------------------------------------------------------------------- models


class PatchAlignPreTrainedModel(PreTrainedModel):
    config_class = PatchAlignConfig
    base_model_prefix = "patch_align"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True  # tower blocks, text encoder, fusion and decoder layers
    _supports_sdpa = True
    _no_split_modules = ["BertLayer", "ViTLayer", "CLIPEncoderLayer", "Dinov2Layer"]
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.text_config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PatchAlignModel):
            init.constant_(module.logit_scale, math.log(1.0 / self.config.itc_temperature))

    def _output_flags(self, output_attentions: bool | None, output_hidden_states: bool | None,
                      return_dict: bool | None) -> tuple[bool, bool, bool]:
        """Unset switches fall back to the config, as transformers' models do."""
        cfg = self.config
        return (cfg.output_attentions if output_attentions is None else output_attentions,
                cfg.output_hidden_states if output_hidden_states is None else output_hidden_states,
                getattr(cfg, "return_dict", True) if return_dict is None else return_dict)

    @classmethod
    def from_vision_text_pretrained(cls, vision: str, text: str, **config_kwargs: Any) -> "PatchAlignPreTrainedModel":
        """Build from any supported vision checkpoint (ViT, CLIP, DINOv2) and any BERT checkpoint (dirs or hub ids).

        The tower and the text encoder get the checkpoints' weights; [CLS] / [SEP] / [MASK] ids come from the
        text checkpoint's tokenizer. Fusion and decoder layers start from the text encoder's last layers (their
        self-attention and MLP, as ALBEF initialises its fusion encoder); cross-attention, the detector, the
        projections and the heads start random. `config_kwargs` go to `PatchAlignConfig`.
        """
        from transformers import AutoTokenizer

        vision_model = AutoModel.from_pretrained(vision)
        vision_config = getattr(vision_model.config, "vision_config", vision_model.config)  # CLIP: the vision half
        text_model = AutoModel.from_pretrained(text)
        if text_model.config.model_type != "bert":
            raise ValueError(f"text checkpoint {text!r}: model_type {text_model.config.model_type!r}; "
                             "PatchAlign needs a BERT-style text encoder (model_type 'bert')")
        tokenizer = AutoTokenizer.from_pretrained(text)
        for name in ("cls", "sep", "mask"):
            token_id = getattr(tokenizer, f"{name}_token_id")
            if token_id is None:
                raise ValueError(f"text checkpoint {text!r}: its tokenizer has no {name} token (PatchAlign needs "
                                 "[CLS], [SEP] and [MASK])")
            config_kwargs.setdefault(f"{name}_token_id", token_id)
        config = PatchAlignConfig(vision_config=vision_config, text_config=text_model.config, **config_kwargs)
        model = cls(config)
        backbone = model if isinstance(model, PatchAlignModel) else model.patch_align
        source = vision_model.vision_model if hasattr(vision_model, "text_model") else vision_model  # CLIPModel
        _load_weights(backbone.vision_tower.vision_model, source.state_dict(), f"vision checkpoint {vision!r}")
        _load_weights(backbone.text_model, text_model.state_dict(), f"text checkpoint {text!r}")
        text_layers = backbone.text_model.encoder.layer
        for layers in (backbone.fusion_layers, backbone.decoder_layers):
            offset = len(text_layers) - len(layers)
            for i, layer in enumerate(layers):
                if offset + i >= 0:
                    _load_weights(layer, text_layers[offset + i].state_dict(), "text encoder layer",
                                  new=("crossattention.",))
        return model


class PatchAlignModel(PatchAlignPreTrainedModel):
    """The shared backbone: vision tower (+ detector), text encoder, fusion layers, decoder, ITC projections."""

    def __init__(self, config: PatchAlignConfig):
        super().__init__(config)
        vcfg, tcfg = config.vision_config, config.text_config
        # config.vision_merging off: r = 0, and prop_attn decides whether blocks after the detector weight the fused
        # token by its size; on: the schedule of the blocks `vision_merging_blocks` names
        self.vision_tower = TokenMergingVisionTower(_build_vision_model(vcfg), config.tower_merging)
        self.text_model = BertModel(tcfg, add_pooling_layer=False)
        self.image_to_text = nn.Linear(vcfg.hidden_size, tcfg.hidden_size)  # image tokens -> cross-attention width
        cross = config.cross_layer_config()
        self.fusion_layers = nn.ModuleList([BertLayer(cross, layer_idx=i) for i in range(config.num_fusion_layers)])
        self.decoder_layers = nn.ModuleList([BertLayer(cross, layer_idx=i) for i in range(config.num_decoder_layers)])
        for layer in (*self.fusion_layers, *self.decoder_layers):
            # BertLayer builds cross-attention only from a decoder config (a copy); its attention modules read their
            # config for the attention implementation alone, so they share text_config's and follow its changes
            layer.attention.self.config = layer.crossattention.self.config = tcfg
        self.vision_proj = nn.Linear(vcfg.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(tcfg.hidden_size, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.itc_temperature)))
        det = config.patch_detector
        if det["enabled"] and self.vision_tower.num_layers < det["layer"]:
            raise ValueError(
                f"patch_detector.layer={det['layer']} exceeds the vision tower's {self.vision_tower.num_layers} layers"
            )
        if det["enabled"]:
            self.detector = TextAwarePatchDetector(vcfg.hidden_size, tcfg.hidden_size, det["hidden_size"])
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.word_embeddings  # shared by the text encoder and the decoder

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embeddings.word_embeddings = value

    # -- encoders ------------------------------------------------------------------------

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Unimodal BERT: (B, T) -> (B, T, Ct)."""
        return self.text_outputs(input_ids, attention_mask).last_hidden_state

    def text_outputs(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_attentions: bool = False,
                     output_hidden_states: bool = False) -> ModelOutput:
        """The text encoder's own output (hidden states and attention maps when asked)."""
        limit = self.config.text_config.max_position_embeddings
        if input_ids.shape[-1] > limit:
            raise ValueError(
                f"PatchAlign: input_ids has {input_ids.shape[-1]} tokens but the text encoder has "
                f"text_config.max_position_embeddings={limit} positions; build inputs with "
                f"PatchAlignProcessor(max_length<={limit})"
            )
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states)

    def encode_image(self, pixel_values: Tensor, text_cls: Tensor | None = None, want_patches: bool = False,
                     output_hidden_states: bool = False, output_attentions: bool = False) -> ImageEncoding:
        """Run the tower once; text_cls (B, Ct) adds the text-aware branch next to the agnostic one."""
        det = self.config.patch_detector
        hooks: list[BlockHook] = []
        capture = None
        if want_patches:
            capture = _CaptureHook(self.config.heads_layer - 1)
            hooks.append(capture)
        agnostic = aware = None
        if det["enabled"]:
            k = det["layer"] - 1
            agnostic = PatchSelectionHook(k, det["keep_ratio"])
            if text_cls is not None:
                aware = PatchSelectionHook(k, det["keep_ratio"], self.detector, text=text_cls,
                                           fuse_weights=det["fuse_weights"], selection=det["selection"])
                hooks.append(DualPatchSelectionHook(agnostic, aware))
            else:
                hooks.append(agnostic)
        # merging before the detector: PTA's per-patch labels follow the merged groups, read from their sources
        track = aware is not None and self.config.merges_before_detector
        tower = self.vision_tower(pixel_values, hooks=hooks, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions, track_sources=track)
        out, B = tower.last_hidden_state, pixel_values.shape[0]
        patches = patch_index = None
        if capture is not None and det["enabled"] and self.config.heads_layer > det["layer"]:
            patch_index = agnostic.kept  # the agnostic rows come first; drop CLS and the fused token
            patches = capture.hidden[:B, 1:1 + patch_index.shape[1]]  # (B, K, Cv)
        elif capture is not None:
            patches = capture.hidden[:, 1:]  # (B, P, Cv)
        # after the detector both branches run stacked on the batch axis: report the agnostic rows
        hidden = tuple(h[:B] for h in tower.hidden_states) if tower.hidden_states is not None else None
        maps = tuple(a[:B] for a in tower.attentions) if tower.attentions else None
        if aware is not None:
            return ImageEncoding(out[:B], out[B:], aware.logits, aware.kept, patches, patch_index, hidden, maps,
                                 aware.token_sources, aware.scores)
        if det["enabled"]:
            return ImageEncoding(out, None, None, agnostic.kept, patches, patch_index, hidden, maps)
        return ImageEncoding(out, out if text_cls is not None else None, None, None, patches, None, hidden, maps)

    def encode_image_pairs(self, pixel_values: Tensor, image_index: Tensor, text_cls: Tensor) -> Tensor:
        """Image tokens (n, N', Cv) of n (image, text) pairs, image image_index[j] pruned by the detector with
        text_cls[j] (n, Ct): blocks 1..k run once per image, the rest once per pair. Without a detector the
        unpruned tokens of each pair's image."""
        det = self.config.patch_detector
        if not det["enabled"]:
            return self.vision_tower(pixel_values).last_hidden_state[image_index]
        hook = PatchSelectionHook(det["layer"] - 1, det["keep_ratio"], self.detector, text=text_cls,
                                  fuse_weights=det["fuse_weights"], rows=image_index, selection=det["selection"])
        return self.vision_tower(pixel_values, hooks=[hook]).last_hidden_state

    def fuse(self, text_embeds: Tensor, attention_mask: Tensor, image_embeds: Tensor) -> Tensor:
        """Fusion layers: bidirectional self-attention over text, cross-attention to image tokens."""
        return self.fusion_outputs(text_embeds, attention_mask, image_embeds).last_hidden_state

    def fusion_outputs(self, text_embeds: Tensor, attention_mask: Tensor, image_embeds: Tensor,
                       output_hidden_states: bool = False, output_attentions: bool = False) -> _LayerStackOutput:
        bias = padding_bias(attention_mask, text_embeds.dtype)
        return _run_cross_layers(self.fusion_layers, text_embeds, bias, self.image_to_text(image_embeds),
                                 output_hidden_states=output_hidden_states, output_attentions=output_attentions)

    def decode(self, input_ids: Tensor, attention_mask: Tensor | None, memory: Tensor) -> Tensor:
        """Decoder: shared text embeddings, causal self-attention, cross-attention to memory (B, M, Ct)."""
        return self.decoder_outputs(input_ids, attention_mask, memory).last_hidden_state

    def decoder_outputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        memory: Tensor,
        position_ids: Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> _LayerStackOutput:
        """attention_mask (B, cached + T) covers the cached keys too; positions default to counting its real
        tokens (left padding). The cache holds self-attention keys / values and the memory's projections."""
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        if position_ids is None:
            position_ids = _positions(attention_mask, input_ids.shape[1])
        hidden = self.text_model.embeddings(input_ids=input_ids, position_ids=position_ids)  # (B, T, Ct)
        bias = _causal_bias(attention_mask, input_ids.shape[1], hidden.dtype)
        return _run_cross_layers(self.decoder_layers, hidden, bias, memory, cache, output_hidden_states,
                                 output_attentions)

    def image_feature(self, image_embeds: Tensor) -> Tensor:
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_feature(self, text_embeds: Tensor) -> Tensor:
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PatchAlignModelOutput | tuple:
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_out = self.text_outputs(input_ids, attention_mask, output_attentions, output_hidden_states)
        text = text_out.last_hidden_state
        enc = self.encode_image(pixel_values, text_cls=text[:, 0], output_hidden_states=output_hidden_states,
                                output_attentions=output_attentions)
        fused = self.fusion_outputs(text, attention_mask, enc.aware, output_hidden_states, output_attentions)
        out = PatchAlignModelOutput(
            image_embeds=enc.agnostic,
            text_embeds=text,
            image_feat=self.image_feature(enc.agnostic),
            text_feat=self.text_feature(text),
            fused_embeds=fused.last_hidden_state,
            patch_scores=enc.logits.sigmoid() if enc.logits is not None else None,
            kept_patches=enc.kept,
            vision_hidden_states=enc.hidden_states,
            vision_attentions=enc.attentions,
            text_hidden_states=text_out.hidden_states,
            text_attentions=text_out.attentions,
            fusion_hidden_states=fused.hidden_states,
            fusion_attentions=fused.attentions,
            fusion_cross_attentions=fused.cross_attentions,
        )
        return out if return_dict else out.to_tuple()


class PatchAlignForPreTraining(PatchAlignPreTrainedModel):
    """All pretraining objectives: ITC, ITM (hard negatives), MLM, captioning LM, PTA, semantic heads."""

    def __init__(self, config: PatchAlignConfig):
        super().__init__(config)
        tcfg, heads = config.text_config, config.semantic_heads
        self.patch_align = PatchAlignModel(config)
        self.itm_head = nn.Linear(tcfg.hidden_size, 2)
        self.mlm_head = _LMHead(tcfg)
        self.lm_head = _LMHead(tcfg)
        self.semantic_heads = SemanticHeads(
            config.vision_config.hidden_size,
            num_classes=len(config.object_classes),
            num_attributes=len(config.attributes),
            teacher_size=config.teacher_size,
            object_class=heads["object_class"]["enabled"],
            attribute=heads["attribute"]["enabled"],
            region_feature=heads["region_feature"]["enabled"],
            region_loss=heads["region_feature"]["loss"],
        )
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head.decoder

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head.decoder = value

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """transformers resizes the shared input embeddings and the captioning LM head; the MLM head follows."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        self.mlm_head.decoder = self._get_resized_lm_head(self.mlm_head.decoder, embeddings.num_embeddings)
        return embeddings

    def _itc(self, image_feat: Tensor, text_feat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        all_text, offset = _gather_with_grad(text_feat)
        all_image, _ = _gather_with_grad(image_feat)
        scale = self.patch_align.logit_scale.clamp(max=math.log(1000.0), min=math.log(2.0)).exp()
        logits_i2t = scale * image_feat @ all_text.t()  # (B, B_all)
        logits_t2i = scale * text_feat @ all_image.t()
        targets = torch.arange(image_feat.shape[0], device=image_feat.device) + offset
        loss = (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets)) / 2
        return loss, logits_i2t, logits_t2i

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        patch_labels: Tensor | None = None,
        pta_mask: Tensor | None = None,
        class_labels: Tensor | None = None,
        attribute_labels: Tensor | None = None,
        attribute_mask: Tensor | None = None,
        region_box_masks: Tensor | None = None,
        region_features: Tensor | None = None,
        region_mask: Tensor | None = None,
        sample_seeds: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PatchAlignForPreTrainingOutput | tuple:
        """ITM and the captioning LM are not computed when their loss weight is 0 (retrieval fine-tuning skips LM).

        MLM and the text-aware branch always run (PTA and the detector's scores need them).
        sample_seeds (B,) int64: per-sample MLM masks (see `mask_tokens`), reproducible across processes.
        """
        cfg, pa, w = self.config, self.patch_align, self.config.loss_weights
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict)
        if cfg.mask_token_id is None:
            raise ValueError("PatchAlignForPreTraining: config.mask_token_id is None (MLM needs the tokenizer's [MASK] "
                             "id); set it in PatchAlignConfig")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        B = input_ids.shape[0]
        text_out = pa.text_outputs(input_ids, attention_mask, output_attentions, output_hidden_states)
        text = text_out.last_hidden_state  # (B, T, Ct)
        tok = cfg.text_config
        special = [i for i in (tok.pad_token_id, cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id) if i is not None]
        masked_ids, mlm_labels = mask_tokens(
            input_ids, attention_mask, cfg.mask_token_id, tok.vocab_size, special, cfg.mlm_probability,
            sample_seeds=sample_seeds, draw_length=tok.max_position_embeddings,
        )
        masked_text = pa.encode_text(masked_ids, attention_mask)
        want_patches = any(cfg.semantic_heads[h]["enabled"] for h in ("object_class", "attribute", "region_feature"))
        enc = pa.encode_image(pixel_values, text_cls=masked_text[:, 0], want_patches=want_patches,
                              output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        losses: dict[str, Tensor] = {}

        # ITC (text-agnostic image embedding)
        image_feat, text_feat = pa.image_feature(enc.agnostic), pa.text_feature(text)
        losses["itc"], logits_i2t, logits_t2i = self._itc(image_feat, text_feat)

        # ITM: positives + one hard negative text per image and one hard negative image per text
        neg_text = neg_image = itm_logits = None
        if B > 1 and w["itm"] > 0:
            same_text = (input_ids[:, None] == input_ids[None]).all(-1) & (
                attention_mask[:, None] == attention_mask[None]
            ).all(-1)  # identical captions are positives too
            eye = torch.eye(B, dtype=torch.bool, device=input_ids.device)
            pos = same_text if (~same_text).sum(1).min() > 0 else eye
            sim = (image_feat @ text_feat.t()).detach()  # (B, B) local pairs
            neg_text = sample_hard_negatives(sim, pos)
            neg_image = sample_hard_negatives(sim.t(), pos.t())
            texts = torch.cat([text, text[neg_text], text])
            masks = torch.cat([attention_mask, attention_mask[neg_text], attention_mask])
            if cfg.patch_detector["itm_text_aware"] and cfg.patch_detector["enabled"]:
                rows = torch.cat([torch.arange(B, device=input_ids.device).repeat(2), neg_image])  # each pair's image
                images = pa.encode_image_pairs(pixel_values, rows, texts[:, 0])
            else:
                images = torch.cat([enc.agnostic, enc.agnostic, enc.agnostic[neg_image]])
            itm_logits = self.itm_head(pa.fuse(texts, masks, images)[:, 0])  # (3B, 2)
            itm_targets = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(input_ids.device)
            losses["itm"] = F.cross_entropy(itm_logits, itm_targets)

        # MLM on the text-aware image tokens
        mlm_logits = self.mlm_head(pa.fuse(masked_text, attention_mask, enc.aware))
        n_masked = (mlm_labels != IGNORE_INDEX).sum()
        losses["mlm"] = F.cross_entropy(
            mlm_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ) / n_masked.clamp(min=1)

        # captioning LM: the image is the prefix, the caption the continuation
        if w["lm"] > 0:
            memory = pa.image_to_text(enc.agnostic)
            lm_logits = self.lm_head(pa.decode(input_ids, attention_mask, memory))
            lm_labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
            losses["lm"] = F.cross_entropy(lm_logits[:, :-1].flatten(0, 1), lm_labels.flatten(), ignore_index=IGNORE_INDEX)

        # PTA on the detector's scores
        if enc.logits is not None and patch_labels is not None:
            mask = pta_mask if pta_mask is not None else torch.ones(B, dtype=torch.bool, device=input_ids.device)
            if enc.token_sources is not None:  # the detector scored merged tokens: labels follow their groups
                patch_labels = group_patch_labels(patch_labels, enc.token_sources)
            losses["pta"] = pta_loss(enc.logits, patch_labels, mask)

        if enc.patches is not None:
            losses.update(
                self.semantic_heads(
                    enc.patches, class_labels, attribute_labels, attribute_mask, region_box_masks, region_features,
                    region_mask, enc.patch_index,
                )
            )
        loss = sum(w[name] * value for name, value in losses.items())
        out = PatchAlignForPreTrainingOutput(
            loss=loss,
            **{f"loss_{name}": value for name, value in losses.items()},
            logits_per_image=logits_i2t,
            itm_logits=itm_logits,
            itm_negative_texts=neg_text,
            itm_negative_images=neg_image,
            patch_scores=enc.logits.sigmoid() if enc.logits is not None else None,
            kept_patches=enc.kept,
            vision_hidden_states=enc.hidden_states,
            vision_attentions=enc.attentions,
            text_hidden_states=text_out.hidden_states,
            text_attentions=text_out.attentions,
        )
        return out if return_dict else out.to_tuple()


class PatchAlignForImageTextRetrieval(PatchAlignPreTrainedModel):
    """ITC scores every (image, text) pair; the ITM head re-ranks each row's top-k (on text-agnostic image tokens,
    or with `patch_detector.itm_text_aware` on each candidate image pruned by the candidate text)."""

    def __init__(self, config: PatchAlignConfig):
        super().__init__(config)
        self.patch_align = PatchAlignModel(config)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.post_init()

    def _itm_scores(self, text: Tensor, mask: Tensor, images: Tensor, pairs: Tensor, pixel_values: Tensor) -> Tensor:
        """pairs (n, 2) of (image, text) indices -> match probability (n,); images: the text-agnostic tokens,
        used unless `patch_detector.itm_text_aware` prunes each pair's image with its text."""
        pa, (i, j), det = self.patch_align, pairs.unbind(1), self.config.patch_detector
        if det["itm_text_aware"] and det["enabled"]:
            image_tokens = pa.encode_image_pairs(pixel_values, i, text[j, 0])
        else:
            image_tokens = images[i]
        return self.itm_head(pa.fuse(text[j], mask[j], image_tokens)[:, 0]).softmax(-1)[:, 1]

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        k: int = 16,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PatchAlignRetrievalOutput | tuple:
        pa = self.patch_align
        return_dict = self._output_flags(None, None, return_dict)[2]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"retrieval k must be an int >= 1, got {k!r}")
        text = pa.encode_text(input_ids, attention_mask)
        images = pa.encode_image(pixel_values).agnostic
        itc = pa.image_feature(images) @ pa.text_feature(text).t()  # (Bi, Bt)
        out = {}
        for name, scores in (("i2t", itc), ("t2i", itc.t())):
            top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (R, k)
            rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(top)
            pairs = torch.stack([rows.flatten(), top.flatten()], dim=1)
            if name == "t2i":
                pairs = pairs.flip(1)  # rows are texts: (image, text) = (top, row)
            reranked = torch.full_like(scores, float("-inf"))
            reranked[rows.flatten(), top.flatten()] = self._itm_scores(text, attention_mask, images, pairs,
                                                                        pixel_values)
            out[f"{name}_scores"] = reranked
        result = PatchAlignRetrievalOutput(itc_scores=itc, **out)
        return result if return_dict else result.to_tuple()


class PatchAlignForConditionalGeneration(PatchAlignPreTrainedModel, GenerationMixin):
    """Captioning: the decoder reads the text-agnostic image tokens; `input_ids` are the decoder tokens.

    With `question_input_ids` (VQA), the question is encoded, prunes the image text-aware and is
    fused with it; the decoder then reads the fused question tokens (mPLUG-style answer decoder).
    `generate` is GenerationMixin's own: the prompt defaults to [CLS] (`bos_token_id`), it stops at [SEP]
    (`eos_token_id`), the image is encoded at the first step only and the decoder keeps a KV cache
    (self-attention keys / values and the memory's cross-attention projections).
    """

    main_input_name = "input_ids"  # the decoder prompt, first in forward; pixel_values travel as a keyword
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: PatchAlignConfig):
        super().__init__(config)
        self.patch_align = PatchAlignModel(config)
        self.lm_head = _LMHead(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_align.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.patch_align.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head.decoder

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head.decoder = value

    def encode_memory(
        self,
        pixel_values: Tensor,
        question_input_ids: Tensor | None = None,
        question_attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """What the decoder cross-attends to: (memory (B, M, Ct), memory mask (B, M) or None)."""
        pa = self.patch_align
        if question_input_ids is None:
            return pa.image_to_text(pa.encode_image(pixel_values).agnostic), None
        if question_attention_mask is None:
            question_attention_mask = torch.ones_like(question_input_ids)
        question = pa.encode_text(question_input_ids, question_attention_mask)
        image = pa.encode_image(pixel_values, text_cls=question[:, 0]).aware
        return pa.fuse(question, question_attention_mask, image), question_attention_mask

    @staticmethod
    def _decoder_cache(cache: Any) -> EncoderDecoderCache:
        """The decoder needs self- and cross-attention caches. generate() prepares a self-attention DynamicCache
        sized for the text encoder's depth: while still empty it is replaced (the new one is returned)."""
        if isinstance(cache, EncoderDecoderCache):
            return cache
        if cache is None or cache.get_seq_length() == 0:
            return EncoderDecoderCache(DynamicCache(), DynamicCache())
        raise ValueError(
            f"PatchAlign's decoder cache must be an EncoderDecoderCache, got a filled {type(cache).__name__}"
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        question_input_ids: Tensor | None = None,
        question_attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        shift_labels: Tensor | None = None,
        **kwargs,
    ) -> PatchAlignGenerationOutput | tuple:
        """labels (B, T) aligned with input_ids (shifted inside), or shift_labels (B, T) already shifted (the
        target of position t is the token at t + 1); IGNORE_INDEX on prompt and padding. attention_mask covers
        cached + new tokens; positions count its real tokens, so left padding changes no logit. The decoder's
        cache travels in **kwargs under transformers' name for it."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            output_attentions, output_hidden_states, return_dict)
        if input_ids is None:
            raise ValueError(f"{type(self).__name__}.forward needs input_ids (the decoder tokens)")
        if encoder_hidden_states is None:
            if pixel_values is None:
                raise ValueError(f"{type(self).__name__}.forward needs pixel_values or encoder_hidden_states")
            encoder_hidden_states, _ = self.encode_memory(pixel_values, question_input_ids, question_attention_mask)
        cache = get_cache(kwargs)
        if use_cache is None:
            use_cache = cache is not None
        cache = self._decoder_cache(cache) if use_cache else None
        decoded = self.patch_align.decoder_outputs(input_ids, attention_mask, encoder_hidden_states, position_ids,
                                                   cache, output_hidden_states, output_attentions)
        logits = self.lm_head(decoded.last_hidden_state)  # (B, T, V)
        loss = None
        if labels is not None and shift_labels is None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # target of position t: token t + 1
        if shift_labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX)
        out = PatchAlignGenerationOutput(
            loss=loss,
            logits=logits,
            hidden_states=decoded.hidden_states,
            attentions=decoded.attentions,
            cross_attentions=decoded.cross_attentions,
            encoder_hidden_states=encoder_hidden_states,
            **{CACHE_NAME: cache},
        )
        return out if return_dict else out.to_tuple()

    # GenerationMixin's inputs; pixel_values stay until the memory is known (an assistant model's first call counts
    # as a continuation, where GenerationMixin drops them). `wraps` keeps GenerationMixin's signature, which generate()
    # checks keywords against and which names the cache as the installed release does.
    @wraps(GenerationMixin.prepare_inputs_for_generation)
    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if inputs.get("encoder_hidden_states") is None and kwargs.get("pixel_values") is not None:
            inputs["pixel_values"] = kwargs["pixel_values"]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict[str, Any], *args: Any,
                                            **kwargs: Any) -> dict[str, Any]:
        """GenerationMixin's update, plus the memory: later steps (and steps without a cache) reuse it instead of
        encoding the image again; with a cache only its cross-attention projections are read."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["encoder_hidden_states"] = outputs.encoder_hidden_states
        return model_kwargs


class PatchAlignForQuestionAnswering(PatchAlignForConditionalGeneration):
    """Generative VQA: question -> text-aware pruning + fusion -> answer decoder. Needs question_input_ids."""

    def encode_memory(self, pixel_values, question_input_ids=None, question_attention_mask=None):
        if question_input_ids is None:
            raise ValueError("PatchAlignForQuestionAnswering needs question_input_ids (the tokenised question)")
        return super().encode_memory(pixel_values, question_input_ids, question_attention_mask)
