"""Task retrieval: a (images, texts) score matrix per family, R@1/5/10 both ways, and PatchAlign's detector
R-precision.

MergeBridge is generative, so its retrieval is likelihood-based: score[i, j] = the mean log-likelihood of caption
j (its tokens and EOS) given image i. PatchAlign: ITC similarity for every pair, each row's top-k re-ranked by
the ITM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from tqdm.auto import tqdm

from ..data.pairs import decode_image, images_and_captions
from ..metrics import retrieval_recall
from .arguments import EvalArguments
from .inputs import pixels_on_model


@torch.no_grad()
def caption_log_likelihoods(model: Any, processor: Any, images: Sequence[PIL.Image.Image], texts: Sequence[str],
                            batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """(num_images, num_texts) float32: mean log-likelihood of text j (its tokens and EOS) as the caption of image i.

    The score matrix of likelihood-based retrieval. Visual prefixes are computed once per image and the texts
    tokenised once; each (image, text) pair is then one LLM sequence, scored in batches of `batch_size` pairs.
    """
    prompt = processor.build_prompt("caption")
    # The token layout of a pair does not depend on its image: tokenise every text once (with a stand-in image,
    # whose pixels are not used).
    tokens = processor(images=[images[0]] * len(texts), text=[prompt] * len(texts), targets=list(texts))
    input_ids = tokens["input_ids"].to(model.device)  # (T, L)
    attention_mask = tokens["attention_mask"].to(model.device)  # (T, L)
    targets = tokens["labels"][:, 1:].to(model.device)  # (T, L-1): next-token targets, -100 off the caption
    features = []
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(list(images[start:start + batch_size]), return_tensors="pt")["pixel_values"]
        features.append(model.get_image_features(pixels.to(model.device, model.dtype)).pooler_output)  # (b, M, C)
    features = torch.cat(features)  # (I, M, C)

    pairs = torch.cartesian_prod(torch.arange(len(images)), torch.arange(len(texts)))  # (I*T, 2), text fastest
    scores = torch.empty(len(pairs), dtype=torch.float32)
    embed = model.get_input_embeddings()
    for start in tqdm(range(0, len(pairs), batch_size), desc="retrieval pairs", unit="batch", disable=not progress):
        image_idx, text_idx = pairs[start:start + batch_size].to(model.device).unbind(1)
        ids = input_ids[text_idx]  # (b, L)
        embeds = embed(ids)  # (b, L, C)
        slots = (ids == processor.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, features[image_idx].to(embeds.dtype))
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask[text_idx]).logits[:, :-1].float()
        target = targets[text_idx]  # (b, L-1)
        keep = target != -100
        logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (b, L-1)
        scores[start:start + len(ids)] = ((logp * keep).sum(1) / keep.sum(1)).cpu()
    return scores.view(len(images), len(texts))


@torch.no_grad()
def patch_align_retrieval_scores(model: Any, processor: Any, images: Sequence[PIL.Image.Image], texts: Sequence[str],
                                 k: int = 16, batch_size: int = 32, itm: bool = True) -> torch.Tensor:
    """(num_images, num_texts): ITC similarity for every pair; with `itm`, each image's top-k texts (and each
    text's top-k images) are re-ranked by the ITM match probability, placed above every other pair.

    Works on any PatchAlign head with `patch_align` and `itm_head` (pretraining or retrieval). Images are
    encoded once (text-agnostic tokens), texts once; ITM runs on the candidate pairs in batches, each pair's image
    pruned by its own text when the config says `patch_detector.itm_text_aware`.
    """
    pa = model.patch_align
    text_aware = pa.config.patch_detector["enabled"] and pa.config.patch_detector["itm_text_aware"]
    image_tokens = torch.cat([pa.encode_image(pixels_on_model(processor, images[s:s + batch_size], model)).agnostic
                              for s in range(0, len(images), batch_size)])  # (I, N', Cv)
    tokens = processor.tokenizer(list(texts), padding=True, truncation=True, max_length=processor.max_length,
                                 return_tensors="pt").to(model.device)
    text = torch.cat([pa.encode_text(tokens["input_ids"][s:s + batch_size], tokens["attention_mask"][s:s + batch_size])
                      for s in range(0, len(texts), batch_size)])  # (T, L, Ct)
    itc = (pa.image_feature(image_tokens) @ pa.text_feature(text).t()).float()  # (I, T)
    if not itm:
        return itc.cpu()
    pairs = set()
    for i, row in enumerate(itc.topk(min(k, itc.shape[1]), dim=1).indices.tolist()):
        pairs.update((i, j) for j in row)
    for j, col in enumerate(itc.t().topk(min(k, itc.shape[0]), dim=1).indices.tolist()):
        pairs.update((i, j) for i in col)
    pairs_t = torch.tensor(sorted(pairs), device=itc.device)  # (n, 2) of (image, text)
    probs = []
    mask = tokens["attention_mask"]
    for s in range(0, len(pairs_t), batch_size):
        i, j = pairs_t[s:s + batch_size].unbind(1)
        if text_aware:  # each pair's image pruned by that pair's text (patch_detector.itm_text_aware)
            unique, rows = i.unique(return_inverse=True)
            pixels = pixels_on_model(processor, [images[u] for u in unique.tolist()], model)
            pair_tokens = pa.encode_image_pairs(pixels, rows, text[j][:, 0])  # (n, N', Cv)
        else:
            pair_tokens = image_tokens[i]
        fused = pa.fuse(text[j], mask[j], pair_tokens)
        probs.append(model.itm_head(fused[:, 0]).float().softmax(-1)[:, 1])
    scores = itc.clone()
    scores[pairs_t[:, 0], pairs_t[:, 1]] = 10.0 + torch.cat(probs)  # ITC lies in [-1, 1]: candidates rank first
    return scores.cpu()


def _r_precision(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per sample with positives: share of positives among the top-|positives| scored patches."""
    out = []
    for s, y in zip(scores, labels):
        n = int(y.sum())
        if n:
            out.append(float(y[s.topk(n).indices].mean()))
    return out


@torch.no_grad()
def detector_precision(model: Any, processor: Any, data: Dataset, batch_size: int = 32) -> float | None:
    """R-precision of the text-aware patch detector against the PTA labels, on each image's first caption.

    PTA labels mark the patches of boxes the caption mentions; the score is the share of those among the
    detector's top-|labels| patches, averaged over images with at least one such patch. None without a detector
    or boxes.
    """
    pa = model.patch_align
    columns = set(data.column_names or [])
    if not model.config.patch_detector["enabled"] or not {"boxes", "box_labels", "captions"} <= columns:
        return None
    data = data.cast_column("image", ImageFeature(decode=False))
    values: list[float] = []
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        rows = [r for r in rows if r["boxes"] and r["captions"]]
        if not rows:
            continue
        images = [decode_image(r["image"], r["image_id"]) for r in rows]
        batch = processor(images=images, text=[r["captions"][0] for r in rows], boxes=[r["boxes"] for r in rows],
                          box_labels=[r["box_labels"] for r in rows]).to(model.device)
        text = pa.encode_text(batch["input_ids"], batch["attention_mask"])
        enc = pa.encode_image(batch["pixel_values"].to(model.dtype), text_cls=text[:, 0])
        values += _r_precision(enc.logits.float().cpu(), batch["patch_labels"].cpu())
    return sum(values) / len(values) if values else None


def run_retrieval(ev: Any, data: Dataset, args: EvalArguments) -> dict[str, Any]:
    """The retrieval entry of eval_results.json: R@k from the evaluator's score matrix (+ its extras)."""
    images, texts, owner = images_and_captions(data)
    scores = ev.retrieval_scores(images, texts, args)  # (I, T)
    metrics = {**retrieval_recall(scores, owner), **ev.retrieval_extras(data, args)}
    return {"metrics": metrics, "method": ev.retrieval_method, "num_images": len(images), "num_texts": len(texts)}
