"""Model and processor per family for train.py: from a checkpoint, from pretrained towers, or tiny from scratch;
and LoRA on MergeBridge's LLM. What the data holds (its words, its box annotations) sizes the tiny models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, IterableDataset

from ..auto import check_model_folder
from .arguments import HEADS, ModelArguments, parse_heads, parse_r


def corpus_of(data: Dataset | IterableDataset, limit: int = 20000) -> list[str]:
    """Captions, questions and answers: the vocabulary of a tokenizer built from scratch."""
    texts: list[str] = []
    for i, row in enumerate(data.select_columns([c for c in ("captions", "questions", "answers") if c in data.column_names])):
        if i >= limit:
            break
        texts += list(row.get("captions") or []) + list(row.get("questions") or [])
        texts += [a for answers in row.get("answers") or [] for a in answers]
    return texts + ["question", ":", "short", "answer"]


def build_merge_bridge(args: ModelArguments, corpus: Sequence[str]) -> tuple[Any, Any]:
    """A MergeBridge model and processor: from a checkpoint, from pretrained towers, or tiny from scratch."""
    from transformers import AutoImageProcessor, AutoModel

    from .. import MergeBridgeConfig, MergeBridgeForConditionalGeneration, MergeBridgeProcessor
    from ..tiny import build_word_tokenizer, tiny_image_processor, tiny_llama_config, tiny_vision_config
    from .shapes_tower import SHAPES_TOWER_DIR

    if args.checkpoint is not None:
        check_model_folder(args.checkpoint, [MergeBridgeConfig.model_type])  # names a wrong model_type early
        model = MergeBridgeForConditionalGeneration.from_pretrained(args.checkpoint)
        processor = MergeBridgeProcessor.from_pretrained(args.checkpoint)
        model.config.freeze_vision, model.config.freeze_llm = args.freeze_vision, args.freeze_llm
        model.apply_freezing()
        return model, processor
    merging = {"r": parse_r(args.bridge_r), "mode": args.bridge_mode, "prop_attn": args.bridge_prop_attn}
    common = dict(bridge_merging=merging, vision_merging={"r": args.vision_r},
                  freeze_vision=args.freeze_vision, freeze_llm=args.freeze_llm)
    if args.vision_model or args.text_model:
        if not (args.vision_model and args.text_model):
            raise ValueError("--vision_model and --text_model go together (both pretrained towers)")
        if args.bridge_init is None:
            common["bridge_config"] = dict(hidden_size=args.bridge_hidden, num_hidden_layers=args.bridge_layers,
                                           num_attention_heads=max(1, args.bridge_hidden // 64),
                                           intermediate_size=4 * args.bridge_hidden,
                                           hidden_dropout_prob=args.bridge_dropout,
                                           attention_probs_dropout_prob=args.bridge_dropout)
        model = MergeBridgeForConditionalGeneration.from_vision_text_pretrained(
            args.vision_model, args.text_model, bridge_init=args.bridge_init, **common)
        processor = MergeBridgeProcessor.from_vision_text_pretrained(args.vision_model, args.text_model,
                                                                     config=model.config)
        return model, processor
    tokenizer = build_word_tokenizer(corpus)
    if args.tiny_vision_init == "shapes":  # the embedded tower pretrained on shapes (training/shapes_tower.py)
        vision_model = AutoModel.from_pretrained(SHAPES_TOWER_DIR)
        vision_config, image_processor = vision_model.config, AutoImageProcessor.from_pretrained(SHAPES_TOWER_DIR)
    else:
        vision_model = None
        vision_config = tiny_vision_config(args.tiny_image_size, args.tiny_patch_size, args.tiny_vision_hidden,
                                           args.tiny_vision_layers)
        image_processor = tiny_image_processor(args.tiny_image_size)
    config = MergeBridgeConfig(
        vision_config=vision_config.to_dict(),
        text_config=tiny_llama_config(len(tokenizer), args.tiny_llm_hidden, args.tiny_llm_layers).to_dict(),
        bridge_config=dict(hidden_size=args.bridge_hidden, num_hidden_layers=args.bridge_layers,
                           num_attention_heads=max(1, args.bridge_hidden // 64), intermediate_size=4 * args.bridge_hidden,
                           hidden_dropout_prob=args.bridge_dropout, attention_probs_dropout_prob=args.bridge_dropout),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **common)
    model = MergeBridgeForConditionalGeneration(config)
    if vision_model is not None:
        model.model.vision_tower.vision_model.load_state_dict(vision_model.state_dict())  # strict: same ViT
    processor = MergeBridgeProcessor(image_processor, tokenizer,
                                     num_image_tokens=config.num_image_tokens,
                                     max_length=config.text_config.max_position_embeddings)
    return model, processor


@dataclass
class AnnotationVocab:
    """What the data's boxes name: object classes, attributes, the teacher feature size (0: none)."""

    object_classes: list[str]
    attributes: list[str]
    teacher_size: int

    @property
    def has_boxes(self) -> bool:
        return bool(self.object_classes)


def annotation_vocab(data: Dataset | IterableDataset, limit: int = 20000) -> AnnotationVocab:
    """Class and attribute vocabularies (sorted) and the teacher feature size, from the first `limit` images."""
    columns = [c for c in ("box_labels", "box_attributes", "box_features") if c in (data.column_names or [])]
    classes: set[str] = set()
    attributes: set[str] = set()
    teacher = 0
    if columns:
        for i, row in enumerate(data.select_columns(columns)):
            if i >= limit:
                break
            classes.update(row.get("box_labels") or [])
            attributes.update(a for per_box in row.get("box_attributes") or [] for a in per_box)
            teacher = teacher or len((row.get("box_features") or [[]])[0])
    return AnnotationVocab(sorted(classes), sorted(attributes), teacher)


def plural_synonyms(classes: Sequence[str]) -> dict[str, list[str]]:
    """English plurals ('-s', '-es') of each class name: a caption saying "two circles" mentions "circle"."""
    return {c: [c + "s", c + "es"] for c in classes}


def patch_align_kwargs(args: ModelArguments, task: str, vocab: AnnotationVocab, depth: int) -> dict[str, Any]:
    """PatchAlignConfig keywords from the flags, the task and what the data annotates."""
    heads = parse_heads(args.semantic_heads) if task == "pretrain" else []
    if "object_class" in heads and not vocab.object_classes:
        raise ValueError("--semantic_heads object_class needs boxes with box_labels in the data; it has none "
                         "(pass --semantic_heads '' to train without it)")
    if "attribute" in heads and not vocab.attributes:
        raise ValueError("--semantic_heads attribute needs box_attributes in the data; it has none")
    if "region_feature" in heads and not vocab.teacher_size:
        raise ValueError("--semantic_heads region_feature needs teacher features (box_features) in the data; it "
                         "has none")
    layer = args.detector_layer or max(1, depth // 2)
    weights = {"pretrain": {}, "retrieval": {"mlm": 0.0, "lm": 0.0, "pta": 0.0}}.get(task, {})  # LM then skipped
    return dict(
        patch_detector=dict(layer=layer, keep_ratio=args.keep_ratio),
        semantic_heads={h: dict(enabled=h in heads) for h in HEADS},
        object_classes=vocab.object_classes, attributes=vocab.attributes,
        teacher_size=vocab.teacher_size if "region_feature" in heads else 0,
        loss_weights=weights, num_fusion_layers=args.fusion_layers, num_decoder_layers=args.decoder_layers,
        embed_dim=args.embed_dim,
    )


def patch_align_class(task: str) -> type:
    """The PatchAlign head a task trains: all objectives (pretrain, retrieval), the caption or answer decoder."""
    from .. import PatchAlignForConditionalGeneration, PatchAlignForPreTraining, PatchAlignForQuestionAnswering

    return {"pretrain": PatchAlignForPreTraining, "retrieval": PatchAlignForPreTraining,
            "caption": PatchAlignForConditionalGeneration, "vqa": PatchAlignForQuestionAnswering}[task]


def build_patch_align(args: ModelArguments, task: str, corpus: Sequence[str], vocab: AnnotationVocab) -> tuple[Any, Any]:
    """A PatchAlign model (the task's head) and processor: from a checkpoint, pretrained towers, or tiny from scratch.

    Tiny from scratch: a tiny ViT and a tiny BERT text encoder (dropout 0: tiny models on small data, and a run
    then does not depend on how many processes draw its dropout masks) over a word tokenizer of the corpus.
    """
    from .. import PatchAlignConfig, PatchAlignProcessor
    from ..tiny import build_bert_word_tokenizer, tiny_image_processor, tiny_vision_config

    model_class = patch_align_class(task)
    if args.checkpoint is not None:
        check_model_folder(args.checkpoint, [PatchAlignConfig.model_type])
        model = model_class.from_pretrained(args.checkpoint)
        processor = PatchAlignProcessor.from_pretrained(args.checkpoint)
        if task == "retrieval":  # fine-tune ITC + ITM only
            model.config.loss_weights.update(mlm=0.0, lm=0.0, pta=0.0)
    elif args.vision_model or args.text_model:
        if not (args.vision_model and args.text_model):
            raise ValueError("--vision_model and --text_model go together (both pretrained towers)")
        from transformers import AutoConfig

        vision_config = AutoConfig.from_pretrained(args.vision_model)
        depth = getattr(vision_config, "vision_config", vision_config).num_hidden_layers
        model = model_class.from_vision_text_pretrained(args.vision_model, args.text_model,
                                                        **patch_align_kwargs(args, task, vocab, depth))
        processor = PatchAlignProcessor.from_vision_text_pretrained(
            args.vision_model, args.text_model, config=model.config, synonyms=plural_synonyms(vocab.object_classes))
    else:
        tokenizer = build_bert_word_tokenizer(corpus)
        hidden = args.tiny_llm_hidden
        config = PatchAlignConfig(
            vision_config=tiny_vision_config(args.tiny_image_size, args.tiny_patch_size, args.tiny_vision_hidden,
                                             args.tiny_vision_layers).to_dict(),
            text_config=dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=hidden,
                             num_hidden_layers=args.tiny_llm_layers, num_attention_heads=max(1, hidden // 32),
                             intermediate_size=4 * hidden, max_position_embeddings=64, pad_token_id=0,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
            mask_token_id=tokenizer.mask_token_id,
            **patch_align_kwargs(args, task, vocab, args.tiny_vision_layers))
        model = model_class(config)
        processor = PatchAlignProcessor(tiny_image_processor(args.tiny_image_size), tokenizer,
                                        patch_size=args.tiny_patch_size, object_classes=vocab.object_classes,
                                        attributes=vocab.attributes, synonyms=plural_synonyms(vocab.object_classes),
                                        max_length=64,
                                        max_position_embeddings=config.text_config.max_position_embeddings)
    # Every head's remote-code entry (not only the saved class's), so the card's AutoModelForImageTextToText
    # snippet loads a pretraining checkpoint without leanvlp installed; save_pretrained keeps existing entries.
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}),
                             "AutoModel": "modeling_patch_align.PatchAlignModel",
                             "AutoModelForPreTraining": "modeling_patch_align.PatchAlignForPreTraining",
                             "AutoModelForImageTextToText": "modeling_patch_align.PatchAlignForConditionalGeneration"}
    backbone = model.patch_align
    for module, frozen in ((backbone.vision_tower, args.freeze_vision), (backbone.text_model, args.freeze_llm)):
        for param in module.parameters():
            param.requires_grad_(not frozen)
    return model, processor


def apply_lora(model: Any, args: ModelArguments) -> Any:
    """LoRA adapters on the LLM (regex `--lora_target`); the bridge trains fully (`modules_to_save`)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target,
                        modules_to_save=["bridge"])
    return get_peft_model(model, config)
