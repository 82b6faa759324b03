"""MergeBridge holds the conventions of transformers' in-tree VLMs (Llava, PaliGemma, Blip2) and of the checks in
transformers' common model / generation tests: layout, save / reload, outputs and switches, generate() modes,
left padding, embeddings, freezing, vision feature layer, BERT init, video with vision merging (issue #13)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, BertConfig, BertModel, ViTModel

from leanvlp import MergeBridgeConfig, MergeBridgeForConditionalGeneration, MergeBridgeModel
from leanvlp.modeling.modeling_merge_bridge import MergeBridgeImageOutput
from leanvlp.modeling.transformers_compat import CACHE_NAME
from leanvlp.tiny import build_word_tokenizer
from test_merge_bridge import IMAGE, images, make_config, make_processor

CORPUS = ["a large red circle to the left of a small blue square", "question: what colour is the circle?"]
# fp32 through 2 + 2 + 2 tiny layers: reordered sums (batching, padding, cache vs none) differ by a few ulps.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(CORPUS)


def build(tokenizer, attn: str = "sdpa", **kw) -> MergeBridgeForConditionalGeneration:
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(make_config(tokenizer, **kw), attn_implementation=attn).eval()


def batch_for(model, tokenizer, n: int = 2, **kw) -> dict:
    proc = make_processor(tokenizer, model.config)
    texts = ["", "question: what colour is the circle?"][:n]
    return dict(proc(images=images(n), text=texts, **kw))


# ----------------------------------------------------------------------------- layout, save / reload


def test_every_registered_class_constructs_with_the_in_tree_layout(tokenizer):
    config = make_config(tokenizer)
    headless = MergeBridgeModel(config)  # image_token_id is set: this used to fail on generation_config
    assert headless.base_model is headless
    assert type(AutoModel.from_config(config)) is MergeBridgeModel
    model = AutoModelForImageTextToText.from_config(config)
    assert type(model) is MergeBridgeForConditionalGeneration
    assert model.base_model_prefix == "model" and model.base_model is model.model
    assert isinstance(model.model, MergeBridgeModel)
    assert {name for name, _ in model.named_children()} == {"model", "lm_head"}
    # the tiny Llama ties its head: one parameter, named as transformers expects
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.all_tied_weights_keys == {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # the old attribute names still reach the parts (read-only shortcuts)
    assert model.bridge is model.model.bridge and model.vision_tower is model.model.vision_tower
    assert model.language_model is model.model.language_model and model.get_decoder() is model.model.language_model
    assert MergeBridgeForConditionalGeneration._supports_sdpa and MergeBridgeForConditionalGeneration._supports_flex_attn
    assert not MergeBridgeForConditionalGeneration._can_compile_fullgraph


def test_untied_llm_keeps_its_own_head(tokenizer):
    text = {**make_config(tokenizer).text_config.to_dict(), "tie_word_embeddings": False}
    model = MergeBridgeForConditionalGeneration(make_config(tokenizer, text_config=text))
    assert model.config.tie_word_embeddings is False and model.all_tied_weights_keys == {}
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    # the top-level field, saved with the config, decides
    tied = MergeBridgeForConditionalGeneration(
        MergeBridgeConfig.from_dict({**model.config.to_dict(), "tie_word_embeddings": True}))
    assert tied.lm_head.weight is tied.get_input_embeddings().weight


def test_from_vision_text_pretrained_copies_an_untied_head(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from leanvlp.tiny import save_tiny_towers

    vision_dir, text_dir = save_tiny_towers(tmp_path, CORPUS, image_size=IMAGE, vision_hidden=32, llm_hidden=32)
    llm = AutoModelForCausalLM.from_pretrained(text_dir)
    untied = AutoModelForCausalLM.from_config(LlamaConfig(**{**llm.config.to_dict(), "tie_word_embeddings": False}))
    untied.save_pretrained(text_dir)
    model = MergeBridgeForConditionalGeneration.from_vision_text_pretrained(str(vision_dir), str(text_dir))
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, untied.lm_head.weight)
    assert torch.equal(model.get_input_embeddings().weight, untied.get_input_embeddings().weight)


def test_save_reload_across_heads_and_dtype(tokenizer, tmp_path):
    model = build(tokenizer)
    batch = batch_for(model, tokenizer)
    model.save_pretrained(tmp_path / "full")
    with torch.no_grad():
        expected = model(**batch)
        reloaded = MergeBridgeForConditionalGeneration.from_pretrained(tmp_path / "full").eval()
        assert torch.equal(reloaded(**batch).logits, expected.logits)
        assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight  # still tied after loading
        headless = AutoModel.from_pretrained(tmp_path / "full").eval()  # the `model.` prefix is dropped
        assert type(headless) is MergeBridgeModel
        hidden = headless(**{k: v for k, v in batch.items()}).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), expected.logits, rtol=0, atol=0)
        headless.save_pretrained(tmp_path / "headless")  # and the prefix is added back for the head model
        grown = MergeBridgeForConditionalGeneration.from_pretrained(tmp_path / "headless").eval()
        assert torch.equal(grown(**batch).logits, expected.logits)
        half = MergeBridgeForConditionalGeneration.from_pretrained(tmp_path / "full", dtype=torch.bfloat16).eval()
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        logits = half(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}).logits
    assert logits.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: logits of this size agree to ~1e-2 through 6 tiny layers
    torch.testing.assert_close(logits.float(), expected.logits, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("freeze_vision, freeze_llm", [(True, True), (False, True), (True, False)])
def test_requires_grad_after_reload_equals_the_config(tokenizer, tmp_path, freeze_vision, freeze_llm):
    def trainable(model) -> dict[str, bool]:
        return {n: p.requires_grad for n, p in model.named_parameters()}

    model = build(tokenizer, freeze_vision=freeze_vision, freeze_llm=freeze_llm)
    expected = {n: not ((n.startswith("model.vision_tower.") and freeze_vision)
                        or (n.startswith(("model.language_model.", "lm_head.")) and freeze_llm))
                for n, _ in model.named_parameters()}
    assert trainable(model) == expected
    model.save_pretrained(tmp_path)
    assert trainable(MergeBridgeForConditionalGeneration.from_pretrained(tmp_path)) == expected
    assert trainable(AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)) == expected
    reloaded, info = MergeBridgeForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert trainable(reloaded) == expected and not info["missing_keys"] and not info["unexpected_keys"]
    # a user who changes the config re-applies it
    reloaded.config.freeze_vision = not freeze_vision
    reloaded.apply_freezing()
    assert all(p.requires_grad is freeze_vision for p in reloaded.model.vision_tower.parameters())


# ----------------------------------------------------------------------------- outputs and switches


def test_tuple_and_dict_outputs_are_equal(tokenizer):
    model = build(tokenizer)
    batch = batch_for(model, tokenizer, targets=["a red circle", "red"])
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        model.config.return_dict = False
        from_config = model(**batch)
        features = model.get_image_features(batch["pixel_values"], return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert len(as_tuple) == len(as_dict.to_tuple()) == len(from_config)
    assert torch.equal(features[1], as_dict.image_outputs.pooler_output)


def test_get_image_features_returns_the_prefix_as_pooler_output(tokenizer):
    model = build(tokenizer)
    pixels = batch_for(model, tokenizer)["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixels)
    assert isinstance(out, MergeBridgeImageOutput)
    assert out.pooler_output.shape == (2, model.config.num_image_tokens, model.config.text_config.hidden_size)
    assert out.last_hidden_state.shape == (2, model.config.num_bridge_input_tokens, model.config.vision_config.hidden_size)
    assert out.bridge_token_counts == [13, 9] and out.hidden_states is None and out.bridge_attentions is None


def test_attentions_and_hidden_states_of_llm_tower_and_bridge(tokenizer):
    model = build(tokenizer, attn="eager")
    batch = batch_for(model, tokenizer)
    b, length = batch["input_ids"].shape
    text, vision, bridge = model.config.text_config, model.config.vision_config, model.config.bridge_config
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True)
        plain = model(**batch)
    assert len(out.attentions) == text.num_hidden_layers
    assert all(a.shape == (b, text.num_attention_heads, length, length) for a in out.attentions)
    assert len(out.hidden_states) == text.num_hidden_layers + 1
    assert all(h.shape == (b, length, text.hidden_size) for h in out.hidden_states)
    image = out.image_outputs
    n0 = model.config.num_vision_tokens  # 17
    assert len(image.hidden_states) == vision.num_hidden_layers + 1
    assert all(h.shape == (b, n0, vision.hidden_size) for h in image.hidden_states)
    assert [a.shape for a in image.attentions] == [(b, vision.num_attention_heads, n0, n0)] * vision.num_hidden_layers
    assert [h.shape[1] for h in image.bridge_hidden_states] == [17, 13, 9]  # r=4 merges per bridge layer
    assert [a.shape[-1] for a in image.bridge_attentions] == [17, 13]  # each layer attends over its input count
    assert plain.attentions is None and plain.hidden_states is None and plain.image_outputs.hidden_states is None
    torch.testing.assert_close(out.logits, plain.logits, **TOL)  # switches change what is returned, not the result


def test_logits_to_keep_and_shift_labels(tokenizer):
    model = build(tokenizer)
    batch = batch_for(model, tokenizer, targets=["a red circle", "red"])
    labels = batch.pop("labels")
    with torch.no_grad():
        full = model(**batch, labels=labels)
        last = model(**batch, logits_to_keep=1).logits
        picked = model(**batch, logits_to_keep=torch.tensor([0, 3])).logits
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        by_shift = model(**batch, shift_labels=shifted)
    torch.testing.assert_close(last, full.logits[:, -1:], **TOL)
    torch.testing.assert_close(picked, full.logits[:, [0, 3]], **TOL)
    torch.testing.assert_close(by_shift.loss, full.loss, **TOL)


def test_inputs_embeds_path_equals_input_ids_path(tokenizer):
    model = build(tokenizer)
    batch = batch_for(model, tokenizer)
    ids = batch.pop("input_ids")
    with torch.no_grad():
        by_ids = model(input_ids=ids, **batch).logits
        embeds = model.get_input_embeddings()(ids)
        by_embeds = model(inputs_embeds=embeds, **batch).logits
        generated = model.generate(input_ids=ids, **batch, max_new_tokens=4, do_sample=False)
        from_embeds = model.generate(inputs_embeds=embeds, **batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(by_embeds, by_ids)
    assert torch.equal(from_embeds, generated[:, ids.shape[1]:])  # with embeds, generate returns only new tokens
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=ids, inputs_embeds=embeds)


def test_resize_token_embeddings_keeps_head_tied_and_reloads(tokenizer, tmp_path):
    model = build(tokenizer)
    vocab = model.config.text_config.vocab_size
    batch = batch_for(model, tokenizer)
    with torch.no_grad():
        before = model(**batch).logits
    model.resize_token_embeddings(vocab + 8)
    assert model.config.text_config.vocab_size == vocab + 8
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.lm_head.weight.shape == (vocab + 8, model.config.text_config.hidden_size)
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after[..., :vocab], before, **TOL)  # old rows unchanged
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(MergeBridgeForConditionalGeneration.from_pretrained(tmp_path).eval()(**batch).logits, after)


# ----------------------------------------------------------------------------- generate()


def _greedy(model, batch, **kw):
    return model.generate(**batch, max_new_tokens=5, do_sample=False, **kw)


def test_every_generate_mode(tokenizer):
    model = build(tokenizer, attn="eager")
    batch = batch_for(model, tokenizer)
    prompt = batch["input_ids"].shape[1]
    greedy = _greedy(model, batch)
    assert greedy.shape == (2, prompt + 5)
    # assisted decoding with the model as its own assistant, and prompt lookup, give greedy's tokens
    assisted = [_greedy(model, {k: v[i:i + 1] for k, v in batch.items()}, assistant_model=model) for i in range(2)]
    assert all(torch.equal(a[0], g) for a, g in zip(assisted, greedy))
    lookup = [_greedy(model, {k: v[i:i + 1] for k, v in batch.items()}, prompt_lookup_num_tokens=2) for i in range(2)]
    assert all(torch.equal(a[0], g) for a, g in zip(lookup, greedy))
    assert torch.equal(_greedy(model, batch, cache_implementation="static"), greedy)
    # sampling: the same seed gives the same tokens, with or without a cache
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        samples.append(model.generate(**batch, max_new_tokens=5, do_sample=True, top_k=0, use_cache=use_cache))
    assert torch.equal(samples[0], samples[1])
    beams = model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False)
    torch.manual_seed(7)
    beam_sample = model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=True, num_return_sequences=2)
    torch.manual_seed(7)
    assert torch.equal(beam_sample, model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=True,
                                                   num_return_sequences=2))
    assert beams.shape[0] == 2 and beam_sample.shape[0] == 4
    assert not (torch.cat([greedy[:, prompt:], beams[:, prompt:], samples[0][:, prompt:]]) ==
                model.config.image_token_id).any()  # the placeholder is never generated


def test_return_dict_in_generate_with_scores_attentions_hidden_states(tokenizer):
    model = build(tokenizer, attn="eager")
    batch = batch_for(model, tokenizer)
    b, prompt = batch["input_ids"].shape
    text = model.config.text_config
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, min_new_tokens=3, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, output_attentions=True, output_hidden_states=True)
    assert torch.equal(out.sequences, _greedy(model, batch, min_new_tokens=3)[:, :prompt + 3])
    assert len(out.scores) == len(out.logits) == len(out.attentions) == len(out.hidden_states) == 3
    assert all(s.shape == (b, text.vocab_size) for s in out.scores)
    assert torch.equal(out.sequences[:, prompt:], torch.stack([s.argmax(-1) for s in out.scores], dim=1))
    for step, (attentions, hidden) in enumerate(zip(out.attentions, out.hidden_states)):
        query = prompt if step == 0 else 1
        assert len(attentions) == text.num_hidden_layers and len(hidden) == text.num_hidden_layers + 1
        assert attentions[0].shape == (b, text.num_attention_heads, query, prompt + step)
        assert hidden[-1].shape == (b, query, text.hidden_size)
    assert out[CACHE_NAME] is not None


def test_left_padded_batch_equals_each_prompt_alone(tokenizer):
    model = build(tokenizer)
    proc = make_processor(tokenizer, model.config)
    texts = ["", "question: what colour is the circle?"]
    batch = proc(images=images(2), text=texts)
    assert not batch["attention_mask"][0, 0]  # the short prompt is left-padded
    together = _greedy(model, batch, min_new_tokens=5)
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
    for i, text in enumerate(texts):
        alone = proc(images=images(2)[i:i + 1], text=[text])
        width = alone["input_ids"].shape[1]
        assert torch.equal(_greedy(model, alone, min_new_tokens=5)[0, width:], together[i, batch["input_ids"].shape[1]:])
        with torch.no_grad():
            torch.testing.assert_close(model(**alone).logits[0, -1], last[i], **TOL)


# ----------------------------------------------------------------------------- vision features, BERT init, video


@pytest.mark.parametrize("layer, norm, reference", [(-1, True, "last"), (-1, False, -1), (-2, False, -2), (1, False, 1)])
def test_vision_feature_layer_equals_the_transformers_tower(tokenizer, layer, norm, reference):
    """At r=0 the features the bridge reads are ViTModel's own hidden state (or its normed last output)."""
    model = build(tokenizer, vision_feature_layer=layer, vision_feature_norm=norm)
    vit = model.model.vision_tower.vision_model
    assert isinstance(vit, ViTModel)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ours = model.get_image_features(pixels).last_hidden_state
        theirs = vit(pixel_values=pixels, output_hidden_states=True)
    expected = theirs.last_hidden_state if reference == "last" else theirs.hidden_states[reference]
    torch.testing.assert_close(ours, expected, **TOL)


def test_vision_feature_layer_config_checks_and_defaults(tokenizer, tmp_path):
    assert make_config(tokenizer).vision_feature_norm is True  # the last layer, normed, unless told otherwise
    assert make_config(tokenizer, vision_feature_layer=-2).vision_feature_norm is False
    for bad in (0, 3, -3, 1.5):
        with pytest.raises(ValueError, match=f"vision_feature_layer={bad!r}"):
            make_config(tokenizer, vision_feature_layer=bad)
    with pytest.raises(ValueError, match="vision_feature_norm=True with vision_feature_layer=-2"):
        make_config(tokenizer, vision_feature_layer=-2, vision_feature_norm=True)
    # with merging inside the tower, the bridge reads the feature layer's count: 17 -> 15 -> 13, layer 1 gives 15
    config = make_config(tokenizer, vision_merging={"r": 2}, vision_feature_layer=1)
    assert config.num_bridge_input_tokens == 15
    model = MergeBridgeForConditionalGeneration(config).eval()
    with torch.no_grad():
        assert model.get_image_features(torch.randn(1, 3, IMAGE, IMAGE)).pooler_output.shape[1] == config.num_image_tokens


def test_from_vision_text_pretrained_reads_the_penultimate_layer_and_bert_token_type_row(tmp_path):
    """EVLGen's start: penultimate tower layer without its final norm; bridge == BERT(inputs_embeds) at r=0,
    token-type row 0 included."""
    from leanvlp.tiny import save_tiny_towers

    vision_dir, text_dir = save_tiny_towers(tmp_path, CORPUS, image_size=IMAGE, vision_hidden=32, llm_hidden=32)
    torch.manual_seed(1)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64, vocab_size=30)).eval()
    assert bert.embeddings.token_type_embeddings.weight[0].abs().sum() > 0
    bert.save_pretrained(tmp_path / "bert")
    model = MergeBridgeForConditionalGeneration.from_vision_text_pretrained(
        str(vision_dir), str(text_dir), bridge_init=str(tmp_path / "bert"), bridge_merging={"r": 0}).eval()
    assert (model.config.vision_feature_layer, model.config.vision_feature_norm) == (-2, False)
    with torch.no_grad():
        out = model.get_image_features(torch.randn(2, 3, IMAGE, IMAGE), output_hidden_states=True)
        projected = model.bridge.input_proj(model.bridge.input_norm(out.last_hidden_state))
        expected = bert(inputs_embeds=projected).last_hidden_state
    torch.testing.assert_close(out.bridge_hidden_states[-1], expected, **TOL)


def test_video_with_merging_inside_the_tower_is_refused(tokenizer):
    with pytest.raises(ValueError, match="temporal_merging=True needs vision_merging r=0"):
        make_config(tokenizer, temporal_merging=True, temporal_dim=16, temporal_heads=2, vision_merging={"r": 2})
    model = build(tokenizer, vision_merging={"r": 2})
    with torch.no_grad(), pytest.raises(ValueError, match="2-frame video with vision_merging.r=2"):
        model.get_image_features(torch.randn(1, 2, 3, IMAGE, IMAGE))
    with torch.no_grad():  # one frame merges one set of groups: nothing is mixed
        single = model.get_image_features(torch.randn(1, 1, 3, IMAGE, IMAGE)).pooler_output
    assert single.shape[1] == model.config.num_image_tokens


@pytest.mark.slow
def test_flex_attention_equals_sdpa(tokenizer):
    """`_supports_flex_attn` holds: the whole model (tower, merging bridge, LLM) under flex equals SDPA."""
    batch = batch_for(build(tokenizer), tokenizer)
    with torch.no_grad():
        sdpa = build(tokenizer)(**batch).logits
        flex = build(tokenizer, attn="flex_attention")(**batch).logits
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)
