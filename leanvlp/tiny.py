"""Tiny, download-free building blocks: the embedded default for the CPU demo and the test suite.

Real users build from pretrained checkpoints (`from_vision_text_pretrained`); these builders make the same
objects from scratch so that everything runs offline in seconds: a word-level tokenizer over a corpus,
tiny vision / LLM / bridge configs, a PIL image processor, and the three saved as local "checkpoints".
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTImageProcessorPil,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _word_level(texts: Iterable[str], specials: list[str], unk: str, template: str,
                marks: list[str], extra_words: Iterable[str] = ()) -> Tokenizer:
    """Lower-cased word-level tokenizer over every word (and punctuation mark) of `texts`, ids sorted after the
    specials so the same corpus always gives the same ids; `template` wraps a single sequence."""
    pre, norm = pre_tokenizers.Whitespace(), normalizers.Lowercase()
    words = set(extra_words)
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(m, vocab[m]) for m in marks])
    return tok


def build_word_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A causal-LM word tokenizer: `<s>` prepended, `</s>` as EOS, `<image>` as the image placeholder."""
    tok = _word_level(texts, SPECIAL_TOKENS, "<unk>", "<s> $A", ["<s>"], extra_words)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=["<image>"], model_max_length=512,
    )


def build_bert_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A BERT-style word tokenizer: `[CLS] words [SEP]`, with `[MASK]` for MLM."""
    tok = _word_level(texts, BERT_SPECIAL_TOKENS, "[UNK]", "[CLS] $A [SEP]", ["[CLS]", "[SEP]"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def tiny_vision_config(image_size: int = 64, patch_size: int = 8, hidden_size: int = 64, layers: int = 2,
                       heads: int = 2, model_type: str = "vit") -> PretrainedConfig:
    """A small ViT-family config (ViTConfig by default; `model_type` picks CLIP, SigLIP or DINOv2 instead)."""
    common = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden_size, image_size=image_size, patch_size=patch_size)
    if model_type == "vit":
        return ViTConfig(**common)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**common)


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 2,
                      max_position_embeddings: int = 256) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                       bos_token_id=2, eos_token_id=3, pad_token_id=0)


def tiny_image_processor(image_size: int = 64) -> ViTImageProcessorPil:
    return ViTImageProcessorPil(size={"height": image_size, "width": image_size},
                                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def save_tiny_towers(out: str | Path, texts: Iterable[str], image_size: int = 64, patch_size: int = 8,
                     vision_hidden: int = 64, vision_layers: int = 2, llm_hidden: int = 64, llm_layers: int = 2,
                     seed: int = 0) -> tuple[Path, Path]:
    """Save a random tiny ViT (+ image processor) and a tiny Llama (+ word tokenizer over `texts`) as two
    ordinary transformers checkpoints, so `from_vision_text_pretrained` can be exercised without downloads."""
    import torch

    out = Path(out)
    torch.manual_seed(seed)
    vision_dir, text_dir = out / "vision", out / "text"
    AutoModel.from_config(tiny_vision_config(image_size, patch_size, vision_hidden, vision_layers)).save_pretrained(vision_dir)
    tiny_image_processor(image_size).save_pretrained(vision_dir)
    tokenizer = build_word_tokenizer(texts)
    llm = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), llm_hidden, llm_layers))
    llm.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    return vision_dir, text_dir


__all__ = ["build_word_tokenizer", "build_bert_word_tokenizer", "BERT_SPECIAL_TOKENS", "tiny_vision_config", "tiny_llama_config", "tiny_image_processor",
           "save_tiny_towers", "SPECIAL_TOKENS"]
