"""Text-guided merging in MergeBridge: the prompt's question keeps its most relevant visual tokens unmerged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_merge_bridge import images, make_config, make_model
from transformers import AutoModelForImageTextToText

from leanvlp import MergeBridgeForConditionalGeneration, MergeBridgeProcessor
from leanvlp.modeling.modeling_merge_bridge import _tower_embeddings, prompt_embeds
from leanvlp.tiny import build_word_tokenizer, tiny_image_processor, tiny_vision_config

CORPUS = [
    "a large red circle to the left of a small blue square",
    "question: what colour is the small square? short answer: red blue green yellow",
]
VISION = tiny_vision_config(48, 8, 32, 2).to_dict()  # 36 patches + CLS = 37 tokens
BRIDGE = {"r": 6}  # 37 -> 31 -> 25 tokens over the 2 bridge layers
GUIDED = {"r": 6, "protect_relevant": 4}
PROMPTS = ["", "question: what colour is the small square? short answer:"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(CORPUS)


def pair(tokenizer, **kw) -> tuple[MergeBridgeForConditionalGeneration, MergeBridgeForConditionalGeneration]:
    """The same weights (same seed) with plain and with text-guided bridge merging."""
    kw.setdefault("vision_config", VISION)
    plain = make_model(tokenizer, bridge_merging=kw.pop("plain", BRIDGE), **kw)
    guided = make_model(tokenizer, bridge_merging=kw.pop("guided", GUIDED), **kw)
    return plain, guided


def batch_for(tokenizer, model, prompts=PROMPTS, **kw):
    proc = MergeBridgeProcessor(tiny_image_processor(48), tokenizer, num_image_tokens=model.config.num_image_tokens,
                                max_length=model.config.text_config.max_position_embeddings)
    return proc(images=images(len(prompts)), text=list(prompts), **kw)


def question_embeds(model, batch) -> torch.Tensor:
    """By hand: the mean input embedding of the tokens after the image block that are neither padding nor target."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    labels = batch.get("labels")
    rows = []
    for b in range(ids.shape[0]):
        last_image = int((ids[b] == model.config.image_token_id).nonzero().max())
        keep = mask[b].clone()
        keep[: last_image + 1] = False
        if labels is not None:
            keep &= labels[b] == -100
        embeds = model.get_input_embeddings().weight[ids[b][keep]]
        rows.append(embeds.mean(0) if keep.any() else torch.zeros(embeds.shape[-1]))
    return torch.stack(rows)


def singletons(sources: torch.Tensor) -> set[int]:
    """Input tokens still alone in their group: (M, N0) 0/1 -> indices."""
    return set(sources[sources.sum(-1) == 1].argmax(-1).tolist())


def top_relevant(relevance: torch.Tensor, protected: int, k: int) -> set[int]:
    rel = relevance[protected:]
    candidates = (rel > rel.mean()).nonzero().flatten()
    order = rel[candidates].argsort(descending=True)[:k]
    return set((candidates[order] + protected).tolist())


def test_switch_off_adds_no_parameters_and_changes_no_bit(tokenizer):
    plain, guided = pair(tokenizer)
    assert plain.state_dict().keys() == guided.state_dict().keys()
    assert all(torch.equal(v, guided.state_dict()[k]) for k, v in plain.state_dict().items())
    assert not plain.config.text_guided and guided.config.text_guided
    batch = batch_for(tokenizer, plain)
    with torch.no_grad():
        reference = plain.get_image_features(batch["pixel_values"]).pooler_output  # the text-free path
        off = plain(**batch)
        on = guided(**batch)
        caption = batch_for(tokenizer, plain, prompts=["", ""])
        caption_plain, caption_guided = plain(**caption).logits, guided(**caption).logits
    assert torch.equal(off.image_outputs.pooler_output, reference)  # guidance off: the prompt changes nothing
    assert torch.equal(caption_guided, caption_plain)  # no question (captioning): the plain-merging fallback
    assert torch.equal(on.image_outputs.pooler_output[0], reference[0])  # the captioning row of a mixed batch
    assert not torch.equal(on.image_outputs.pooler_output[1], reference[1])  # the question row: guidance acts


def test_equal_relevance_is_plain_merging(tokenizer):
    plain, guided = pair(tokenizer)
    pixels = batch_for(tokenizer, plain)["pixel_values"]
    with torch.no_grad():
        reference = plain.get_image_features(pixels, track_sources=True)
        zero_text = guided.get_image_features(pixels, track_sources=True, text_embeds=torch.zeros(2, 32))
        vision = reference.last_hidden_state
        bridge = guided.bridge
        x = bridge.dropout(bridge.embed_norm(bridge.input_proj(bridge.input_norm(vision))
                                            + bridge.position_embeddings.weight))
        flat = bridge.encoder(x, track_sources=True, relevance=torch.full(vision.shape[:2], 0.25))
    assert torch.equal(zero_text.pooler_output, reference.pooler_output)
    assert torch.equal(zero_text.bridge_sources, reference.bridge_sources)
    assert torch.equal(bridge.output_proj(flat.last_hidden_state), reference.pooler_output)
    assert torch.equal(flat.sources, reference.bridge_sources)


def test_relevant_tokens_are_never_merged_and_counts_follow_the_config(tokenizer):
    plain, guided = pair(tokenizer)
    batch = batch_for(tokenizer, guided, prompts=[PROMPTS[1]] * 2)
    text = question_embeds(guided, batch)
    with torch.no_grad():
        out = guided.get_image_features(batch["pixel_values"], track_sources=True, text_embeds=text)
        relevance = guided.bridge.text_relevance(out.last_hidden_state, text)  # (2, 37)
        plain_out = plain.get_image_features(batch["pixel_values"], track_sources=True)
    config = guided.config
    assert out.bridge_token_counts == config.bridge_merging_config.token_counts(37, 2) == [31, 25]
    assert out.pooler_output.shape[1] == config.num_image_tokens == 25
    lost = []
    for b in range(2):
        relevant = top_relevant(relevance[b], protected=1, k=4)
        assert len(relevant) == 4
        assert relevant <= singletons(out.bridge_sources[b]), f"image {b}: a relevant token was merged"
        lost.append(relevant - singletons(plain_out.bridge_sources[b]))
    assert any(lost)  # merged plainly, some of them are lost: the check can fail


def test_vision_tower_guidance_protects_through_its_sources(tokenizer):
    plain = make_model(tokenizer, vision_config=VISION, bridge_merging={"r": 0}, vision_merging={"r": 3})
    guided = make_model(tokenizer, vision_config=VISION, bridge_merging={"r": 0},
                        vision_merging={"r": 3, "protect_relevant": 3})
    assert guided.config.vision_text_guided and not guided.config.bridge_text_guided
    batch = batch_for(tokenizer, guided, prompts=[PROMPTS[1]] * 2)
    text = question_embeds(guided, batch)
    with torch.no_grad():
        out = guided.get_image_features(batch["pixel_values"], track_sources=True, text_embeds=text)
        relevance = guided.bridge.text_relevance(_tower_embeddings(guided.vision_tower, batch["pixel_values"]), text)
        reference = plain.get_image_features(batch["pixel_values"], track_sources=True)
        fallback = guided.get_image_features(batch["pixel_values"], text_embeds=torch.zeros(2, 32))
    assert out.pooler_output.shape[1] == guided.config.num_image_tokens == 37 - 6
    assert torch.equal(fallback.pooler_output, reference.pooler_output)
    for b in range(2):
        assert top_relevant(relevance[b], protected=1, k=3) <= singletons(out.vision_sources[b])
    assert not torch.equal(out.vision_sources, reference.vision_sources)


def test_prompt_text_is_the_question_never_the_target_or_padding(tokenizer):
    _, guided = pair(tokenizer)
    batch = batch_for(tokenizer, guided, prompts=[PROMPTS[1], "question: what colour?"], targets=["red", "blue"])
    assert (batch["labels"] != -100).any(dim=1).all() and not batch["attention_mask"].all()  # targets, padding
    embeds = guided.get_input_embeddings()(batch["input_ids"])
    image_mask = batch["input_ids"] == guided.config.image_token_id
    expected = question_embeds(guided, batch)
    got = prompt_embeds(embeds, image_mask, batch["attention_mask"], batch["labels"] == -100)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # a mean of a few fp32 rows
    no_text = prompt_embeds(embeds, image_mask)  # without the masks the targets and padding would count
    assert not torch.allclose(no_text, expected)
    with torch.no_grad():
        trained = guided(**batch)  # labels given: the targets are excluded inside forward
        by_hand = guided.get_image_features(batch["pixel_values"], text_embeds=got)
    assert torch.equal(trained.image_outputs.pooler_output, by_hand.pooler_output)
    with pytest.raises(ValueError, match=r"text_guidance_mask must be \(B, L\)"):
        guided(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], text_guidance_mask=image_mask[:, 1:])


def test_guidance_beyond_the_schedule_fails_at_config_time_naming_the_field(tokenizer):
    # 37 tokens, CLS protected, r=6 over 2 layers: A/B 18/18 then 15/15 -> min(Na - r, Nb - 1) = 12, 9
    with pytest.raises(ValueError, match=r"MergeBridgeConfig.bridge_merging: .*protect_relevant=10 .* at most 9"):
        make_config(tokenizer, vision_config=VISION, bridge_merging={"r": 6, "protect_relevant": 10})
    with pytest.raises(ValueError, match=r"MergeBridgeConfig.vision_merging: .*protect_relevant=40"):
        make_config(tokenizer, vision_config=VISION, vision_merging={"r": 3, "protect_relevant": 40})
    assert make_config(tokenizer, vision_config=VISION, bridge_merging={"r": 6, "protect_relevant": 9}).text_guided


def test_generate_reads_the_prompt_at_prefill_cached_or_not(tokenizer):
    _, guided = pair(tokenizer)
    batch = batch_for(tokenizer, guided)  # left-padded generation inputs: a caption row and a question row
    run = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cached = guided.generate(**batch, **run)
    uncached = guided.generate(**batch, **run, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits):  # re-reading the images each step,
        torch.testing.assert_close(step_cached, step_uncached)  # guidance still reads the prompt only
    cached = cached.sequences
    beams = guided.generate(**batch, max_new_tokens=5, num_beams=2, do_sample=False)
    assert torch.equal(beams, guided.generate(**batch, max_new_tokens=5, num_beams=2, do_sample=False,
                                              use_cache=False))
    with torch.no_grad():  # the first generated token is the prefill's argmax with the question as text
        logits = guided(**batch).logits[:, -1]
    assert torch.equal(cached[:, batch["input_ids"].shape[1]], logits.argmax(-1))


def test_one_training_step_with_guidance_in_tower_and_bridge(tokenizer):
    model = make_model(tokenizer, vision_config=VISION, bridge_merging=GUIDED, freeze_vision=False,
                       vision_merging={"r": 2, "protect_relevant": 2}).train()
    batch = batch_for(tokenizer, model, prompts=PROMPTS, targets=["a red circle", "blue"])
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.vision_tower.vision_model.embeddings.patch_embeddings.projection.weight.grad is not None
    opt.step()
    changed = {k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(before[k], v)}
    assert any(k.startswith("model.bridge.") for k in changed)
    assert any(k.startswith("model.vision_tower.") for k in changed)


REMOTE = textwrap.dedent(
    """
    import sys
    sys.modules["leanvlp"] = None  # remote code only
    import torch
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert model.config.text_guided
    batch = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(model(**batch).logits, sys.argv[3])
    """
)


def test_save_reload_and_remote_code_keep_the_guidance(tokenizer, tmp_path):
    _, guided = pair(tokenizer, vision_merging={"r": 2, "protect_relevant": 2})
    batch = dict(batch_for(tokenizer, guided))
    with torch.no_grad():
        expected = guided(**batch).logits
    guided.save_pretrained(tmp_path / "ckpt")
    local = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt").eval()
    assert local.config.bridge_merging["protect_relevant"] == 4 and local.config.vision_merging["protect_relevant"] == 2
    with torch.no_grad():
        assert torch.equal(local(**batch).logits, expected)
    torch.save(batch, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path / "ckpt"), str(tmp_path / "batch.pt"),
                             str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)


def test_every_image_of_a_prompt_reads_that_prompt(tokenizer):
    _, guided = pair(tokenizer)
    proc = MergeBridgeProcessor(tiny_image_processor(48), tokenizer, num_image_tokens=guided.config.num_image_tokens,
                                max_length=guided.config.text_config.max_position_embeddings)
    batch = proc(images=[images(2, seed=1), images(1, seed=2)],
                 text=["<image><image>what colour is the small square?", "<image>"])
    question = question_embeds(guided, {**batch, "input_ids": batch["input_ids"][:1],
                                        "attention_mask": batch["attention_mask"][:1]})
    text = torch.cat([question, question, torch.zeros(1, 32)])  # image 1 and 2: the question; image 3: none
    with torch.no_grad():
        out = guided(**batch)
        by_hand = guided.get_image_features(batch["pixel_values"], text_embeds=text)
    assert torch.equal(out.image_outputs.pooler_output, by_hand.pooler_output)
