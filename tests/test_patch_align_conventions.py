"""PatchAlign follows transformers' model and generation conventions (issue #14), on tiny random configs.

What transformers' own common mixins check (tests/test_modeling_common.py, tests/generation/test_utils.py), asked of
PatchAlign: output switches, attention implementations, embedding resizing, main_input_name, stock generate with a
KV cache (greedy, beam, assisted, return_dict_in_generate), left padding, shift_labels, gradient checkpointing.
"""

import pytest
import torch
from transformers import EncoderDecoderCache, GenerationMixin

from leanvlp.modeling.configuration_patch_align import PatchAlignConfig
from leanvlp.modeling.modeling_patch_align import (
    PatchAlignForConditionalGeneration,
    PatchAlignForImageTextRetrieval,
    PatchAlignForPreTraining,
    PatchAlignForQuestionAnswering,
    PatchAlignModel,
)
from leanvlp.modeling.transformers_compat import CACHE_NAME

V = 40  # vocabulary: 0 pad, 1 [CLS], 2 [SEP], 3 [MASK]
VISION_LAYERS, TEXT_LAYERS, FUSION, DECODER = 3, 2, 2, 3  # decoder deeper than the text encoder on purpose


def config(**overrides) -> PatchAlignConfig:
    kw = dict(
        vision_config=dict(model_type="vit", hidden_size=32, num_hidden_layers=VISION_LAYERS, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=8),
        text_config=dict(model_type="bert", vocab_size=V, hidden_size=32, num_hidden_layers=TEXT_LAYERS,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
        num_fusion_layers=FUSION, num_decoder_layers=DECODER, embed_dim=16,
        patch_detector=dict(layer=2, keep_ratio=0.5), cls_token_id=1, sep_token_id=2, mask_token_id=3,
    )
    kw.update(overrides)
    return PatchAlignConfig(**kw)


def inputs(B: int = 2, T: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, T), generator=g)
    ids[:, 0] = 1
    return torch.randn(B, 3, 32, 32, generator=g), ids


def eager_and_sdpa(cls: type, **overrides):
    """The same weights under both attention implementations (set through transformers' own switch)."""
    torch.manual_seed(0)
    sdpa = cls(config(**overrides)).eval()
    eager = cls(config(**overrides)).eval()
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    return eager, sdpa


# ----------------------------------------------------------------------------- outputs and switches


def test_hidden_states_and_attentions_have_each_parts_depth_and_shape():
    model, _ = eager_and_sdpa(PatchAlignModel)
    px, ids = inputs()
    with torch.no_grad():
        out = model(px, ids, output_hidden_states=True, output_attentions=True)
    B, T, K = 2, ids.shape[1], model.config.num_kept_patches
    vis = [t.shape for t in out.vision_hidden_states]
    assert vis == [(B, 17, 32)] * 2 + [(B, K + 2, 32)] * 2  # embeddings, block 1, 2 (then pruned), 3
    assert [a.shape for a in out.vision_attentions] == [(B, 2, 17, 17)] * 2 + [(B, 2, K + 2, K + 2)]
    assert [t.shape for t in out.text_hidden_states] == [(B, T, 32)] * (TEXT_LAYERS + 1)
    assert [a.shape for a in out.text_attentions] == [(B, 2, T, T)] * TEXT_LAYERS
    assert [t.shape for t in out.fusion_hidden_states] == [(B, T, 32)] * (FUSION + 1)
    assert [a.shape for a in out.fusion_attentions] == [(B, 2, T, T)] * FUSION
    assert [a.shape for a in out.fusion_cross_attentions] == [(B, 2, T, K + 2)] * FUSION
    assert torch.equal(out.fusion_hidden_states[-1], out.fused_embeds)
    assert torch.equal(out.text_hidden_states[-1], out.text_embeds)
    for maps in (out.vision_attentions, out.text_attentions, out.fusion_attentions, out.fusion_cross_attentions):
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(maps[0].shape[:-1]))  # probabilities
    plain = model(px, ids)
    assert plain.vision_hidden_states is None and plain.fusion_attentions is None  # off by default


def test_decoder_hidden_states_and_attentions():
    model, _ = eager_and_sdpa(PatchAlignForConditionalGeneration)
    px, ids = inputs()
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, output_hidden_states=True, output_attentions=True)
    T, M = ids.shape[1], model.config.num_kept_patches + 2
    assert [t.shape for t in out.hidden_states] == [(2, T, 32)] * (DECODER + 1)
    assert [a.shape for a in out.attentions] == [(2, 2, T, T)] * DECODER
    assert [a.shape for a in out.cross_attentions] == [(2, 2, T, M)] * DECODER
    assert (out.attentions[0].triu(1) == 0).all()  # causal


def test_config_switches_are_the_defaults():
    cfg = config(output_hidden_states=True)
    model = PatchAlignForConditionalGeneration(cfg).eval()
    px, ids = inputs()
    with torch.no_grad():
        assert len(model(input_ids=ids, pixel_values=px).hidden_states) == DECODER + 1


@pytest.mark.parametrize("cls", [PatchAlignModel, PatchAlignForPreTraining, PatchAlignForImageTextRetrieval,
                                 PatchAlignForConditionalGeneration])
def test_return_dict_false_gives_the_same_values_as_a_tuple(cls):
    torch.manual_seed(0)
    model = cls(config()).eval()
    px, ids = inputs()
    kwargs = dict(input_ids=ids, pixel_values=px)
    if cls is PatchAlignForConditionalGeneration:
        kwargs["labels"] = ids
    torch.manual_seed(1)
    as_dict = model(**kwargs)
    torch.manual_seed(1)  # pretraining draws its MLM mask and hard negatives
    as_tuple = model(**kwargs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for a, b in zip(as_tuple, as_dict.to_tuple()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- attention implementations


@pytest.mark.parametrize("cls", [PatchAlignModel, PatchAlignForConditionalGeneration])
def test_eager_equals_sdpa_and_eager_reaches_every_part(cls):
    eager, sdpa = eager_and_sdpa(cls)
    pa = eager.patch_align if cls is not PatchAlignModel else eager
    layers = (pa.fusion_layers[0].attention.self, pa.decoder_layers[0].crossattention.self,
              pa.text_model.encoder.layer[0].attention.self)
    assert all(m.config._attn_implementation == "eager" for m in layers)
    assert pa.vision_tower.backend == "eager"
    px, ids = inputs()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding goes through the bias in both
    with torch.no_grad():
        a = eager(pixel_values=px, input_ids=ids, attention_mask=mask)
        b = sdpa(pixel_values=px, input_ids=ids, attention_mask=mask)
    for name in ("fused_embeds", "image_embeds", "text_embeds") if cls is PatchAlignModel else ("logits",):
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)  # fp32, a few layers: summation order


def test_attention_implementation_per_sub_config():
    torch.manual_seed(0)
    model = PatchAlignModel(config()).eval()
    model.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa"})
    assert model.vision_tower.backend == "eager"
    assert model.fusion_layers[0].attention.self.config._attn_implementation == "sdpa"
    px, ids = inputs()
    with torch.no_grad():
        out = model(px, ids, output_attentions=True)
    assert len(out.vision_attentions) == VISION_LAYERS
    assert out.fusion_attentions is None  # SDPA computes no maps (a warning says so)


# ----------------------------------------------------------------------------- embeddings, input names, ids


@pytest.mark.parametrize("cls", [PatchAlignModel, PatchAlignForConditionalGeneration, PatchAlignForPreTraining])
def test_resize_token_embeddings_grows_input_and_output_and_keeps_old_rows(cls):
    torch.manual_seed(0)
    model = cls(config()).eval()
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(V + 7)
    assert model.get_input_embeddings().weight.shape == (V + 7, 32)
    assert model.config.text_config.vocab_size == V + 7
    assert torch.equal(model.get_input_embeddings().weight[:V], old)
    pa = model if cls is PatchAlignModel else model.patch_align
    assert pa.text_model.embeddings.word_embeddings is model.get_input_embeddings()  # the decoder reads it too
    if cls is PatchAlignForConditionalGeneration:
        head = model.get_output_embeddings()
        assert head.weight.shape == (V + 7, 32) and head.bias.shape == (V + 7,)
        px, ids = inputs()
        ids[0, 2] = V + 5  # a new token id runs through encoder and decoder
        with torch.no_grad():
            assert model(input_ids=ids, pixel_values=px).logits.shape == (2, ids.shape[1], V + 7)
    if cls is PatchAlignForPreTraining:  # both LM heads (captioning, MLM) follow; the new id is an LM target
        assert model.lm_head.decoder.weight.shape == model.mlm_head.decoder.weight.shape == (V + 7, 32)
        px, ids = inputs()
        ids[:, 2:] = V + 5
        out = model(px, ids)
        assert torch.isfinite(out.loss) and torch.isfinite(out.loss_lm)
    if cls is PatchAlignForConditionalGeneration:
        replacement = torch.nn.Embedding(V + 7, 32)
        model.set_input_embeddings(replacement)
        assert model.get_input_embeddings() is replacement


def test_main_input_name_is_the_first_forward_argument():
    import inspect

    for cls in (PatchAlignModel, PatchAlignForPreTraining, PatchAlignForImageTextRetrieval,
                PatchAlignForConditionalGeneration, PatchAlignForQuestionAnswering):
        params = list(inspect.signature(cls.forward).parameters)  # params[0] is self
        assert params[1] == cls.main_input_name, (cls.__name__, params[:3], cls.main_input_name)


def test_special_token_defaults_follow_the_text_config():
    small = dict(model_type="bert", vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64)
    cfg = config(text_config=small, cls_token_id=None, sep_token_id=None, mask_token_id=None)
    assert (cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id) == (None, None, None)  # BERT's 101.. do not fit
    cfg = config(text_config={**small, "bos_token_id": 5, "eos_token_id": 6}, cls_token_id=None, sep_token_id=None)
    assert (cfg.cls_token_id, cfg.sep_token_id, cfg.bos_token_id, cfg.eos_token_id) == (5, 6, 5, 6)
    big = config(text_config={**small, "vocab_size": 200}, cls_token_id=None, sep_token_id=None, mask_token_id=None)
    assert (big.cls_token_id, big.sep_token_id, big.mask_token_id) == (101, 102, 103)
    with pytest.raises(ValueError, match=r"sep_token_id must be a token id in \[0, 50\), got 77"):
        config(text_config=small, sep_token_id=77)
    model = PatchAlignForPreTraining(config(text_config=small, mask_token_id=None))
    px, ids = inputs()
    with pytest.raises(ValueError, match="mask_token_id is None"):
        model(px, ids)
    gen = PatchAlignForConditionalGeneration(config())
    assert (gen.generation_config.bos_token_id, gen.generation_config.eos_token_id,
            gen.generation_config.pad_token_id) == (1, 2, 0)


# ----------------------------------------------------------------------------- generation


def generator(seed: int = 0) -> PatchAlignForConditionalGeneration:
    torch.manual_seed(seed)
    return PatchAlignForConditionalGeneration(config()).eval()


def test_generate_is_the_stock_one_and_cached_equals_uncached():
    model = generator()
    assert type(model).generate is GenerationMixin.generate
    px, _ = inputs(B=3)
    cached = model.generate(pixel_values=px, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    uncached = model.generate(pixel_values=px, max_new_tokens=8, do_sample=False, min_new_tokens=8, use_cache=False)
    assert cached.shape == (3, 9) and (cached[:, 0] == 1).all()
    assert torch.equal(cached, uncached)
    # [SEP] is only the default end token: another one given to generate() stops the row there
    stop = int(cached[0, 3])
    ended = model.generate(pixel_values=px[:1], max_new_tokens=8, do_sample=False, eos_token_id=stop)
    assert torch.equal(ended[0], cached[0, :int((cached[0, 1:] == stop).nonzero()[0]) + 2])
    # and step by step through forward with the cache equals one full forward
    with torch.no_grad():
        full = model(input_ids=cached, pixel_values=px).logits
        step = model(input_ids=cached[:, :4], pixel_values=px, use_cache=True)
        assert isinstance(step[CACHE_NAME], EncoderDecoderCache)
        logits = [step.logits]
        for t in range(4, cached.shape[1]):
            step = model(input_ids=cached[:, t:t + 1], encoder_hidden_states=step.encoder_hidden_states,
                         use_cache=True, **{CACHE_NAME: step[CACHE_NAME]})
            logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_encodes_the_image_once_and_feeds_one_token_per_step_with_the_cache():
    model = generator()
    px, _ = inputs(B=2)
    seen: dict[str, list[int]] = {"decoder_tokens": [], "image_batches": []}
    model.patch_align.text_model.embeddings.register_forward_hook(
        lambda _m, args, kwargs, _out: seen["decoder_tokens"].append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    model.patch_align.vision_tower.register_forward_hook(lambda _m, args, _out: seen["image_batches"].append(1))
    for use_cache, tokens in ((True, [1, 1, 1, 1]), (False, [1, 2, 3, 4])):
        seen["decoder_tokens"].clear(), seen["image_batches"].clear()
        model.generate(pixel_values=px, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=use_cache)
        assert seen == {"decoder_tokens": tokens, "image_batches": [1]}, (use_cache, seen)


def test_attn_implementation_at_load_time(tmp_path):
    model = generator()
    model.save_pretrained(tmp_path)
    loaded = PatchAlignForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation={"vision_config": "eager", "text_config": "eager"}).eval()
    assert loaded.patch_align.vision_tower.backend == "eager"
    assert loaded.patch_align.decoder_layers[0].crossattention.self.config._attn_implementation == "eager"
    px, ids = inputs()
    with torch.no_grad():
        a = loaded(input_ids=ids, pixel_values=px, output_attentions=True)
        b = model(input_ids=ids, pixel_values=px)
    assert len(a.attentions) == DECODER and len(a.cross_attentions) == DECODER
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_beam_search_cached_equals_uncached_and_return_dict_in_generate():
    model = generator()
    px, _ = inputs(B=2)
    kw = dict(pixel_values=px, max_new_tokens=5, num_beams=3, do_sample=False)
    beams = model.generate(**kw)
    assert torch.equal(beams, model.generate(**kw, use_cache=False))
    out = model.generate(**kw, return_dict_in_generate=True, output_scores=True, output_hidden_states=True,
                         output_attentions=True)
    assert torch.equal(out.sequences, beams) and out.sequences_scores.shape == (2,)
    assert len(out.hidden_states[0]) == DECODER + 1  # per step, the decoder's hidden states
    greedy = model.generate(pixel_values=px, max_new_tokens=5, return_dict_in_generate=True, output_scores=True,
                            output_attentions=True)
    assert len(greedy.scores) == greedy.sequences.shape[1] - 1 and greedy.scores[0].shape == (2, V)


def test_assisted_decoding_equals_greedy():
    model, assistant = generator(0), generator(1)  # a different assistant: some drafts are rejected
    for seed in range(3):
        px, _ = inputs(B=1, seed=seed)
        greedy = model.generate(pixel_values=px, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assisted = model.generate(pixel_values=px, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                  assistant_model=assistant)
        assert torch.equal(assisted, greedy), seed
        prompt = greedy[:, :1]
        self_assisted = model.generate(prompt, pixel_values=px, max_new_tokens=10, min_new_tokens=10,
                                       do_sample=False, prompt_lookup_num_tokens=3)
        assert torch.equal(self_assisted, greedy), seed


def test_left_padding_equals_one_by_one():
    model = generator()
    px, ids = inputs(B=2, T=5)
    prompts = [ids[0, :5], ids[1, :2]]
    single = [model.generate(p[None], pixel_values=px[i:i + 1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
              for i, p in enumerate(prompts)]
    padded = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, 5 - len(p):], mask[i, 5 - len(p):] = p, 1
    batch = model.generate(padded, attention_mask=mask, pixel_values=px, max_new_tokens=6, min_new_tokens=6,
                           do_sample=False)
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i, 5:], single[i][0, len(p):]), i
    with torch.no_grad():  # and the logits of the real tokens equal the unpadded ones
        got = model(input_ids=padded, attention_mask=mask, pixel_values=px).logits[1, 3:]
        want = model(input_ids=prompts[1][None], pixel_values=px[1:2]).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_forwards_extra_keywords_and_vqa_generates_with_a_cache():
    model = generator()
    px, ids = inputs(B=2)
    qa = PatchAlignForQuestionAnswering(model.config).eval()
    qa.load_state_dict(model.state_dict())
    kw = dict(pixel_values=px, question_input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    answer = qa.generate(**kw)
    assert torch.equal(answer, qa.generate(**kw, use_cache=False))
    answer_scores = qa.generate(**kw, return_dict_in_generate=True, output_scores=True).scores[0]
    caption_scores = model.generate(pixel_values=px, max_new_tokens=1, return_dict_in_generate=True,
                                    output_scores=True).scores[0]
    assert not torch.allclose(answer_scores, caption_scores)  # the question reached the decoder's memory


def test_shift_labels_equals_labels():
    model = generator()
    px, ids = inputs()
    labels = ids.clone()
    labels[:, :2] = -100
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=px, labels=labels).loss
        b = model(input_ids=ids, pixel_values=px, shift_labels=shifted).loss
        logits = model(input_ids=ids, pixel_values=px).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(a, manual)
    torch.testing.assert_close(b, manual)


# ----------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("cls", [PatchAlignForPreTraining, PatchAlignForConditionalGeneration])
def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_every_part(cls):
    assert cls.supports_gradient_checkpointing
    cfg = config()
    for sub in (cfg.text_config, cfg.vision_config):
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            setattr(sub, name, 0.0)
    torch.manual_seed(0)
    plain = cls(cfg).train()
    ckpt = cls(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    # 5.24 renamed the switch (the old name warns); 5.18 has only the old one
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    px, ids = inputs()
    pa = ckpt.patch_align
    calls = {}
    parts = {"vision": pa.vision_tower.layers[-1], "text": pa.text_model.encoder.layer[-1],
             "fusion": pa.fusion_layers[-1], "decoder": pa.decoder_layers[-1]}
    for name, layer in parts.items():
        # the layer's first submodule runs once in forward and once more when backward recomputes the block
        first = layer.layernorm_before if name == "vision" else layer.attention  # ViT's adapter skips .attention
        first.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(3)
        kwargs = dict(labels=ids) if cls is PatchAlignForConditionalGeneration else {}
        loss = model(pixel_values=px, input_ids=ids, **kwargs).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    forward_calls = {"vision": 1, "text": 2, "fusion": 2, "decoder": 1}  # text: caption + masked; fusion: ITM + MLM
    if cls is PatchAlignForConditionalGeneration:
        forward_calls = {"vision": 1, "text": 0, "fusion": 0, "decoder": 1}
    assert calls == {name: 2 * n for name, n in forward_calls.items() if n}, calls
