"""Composition switches (#16): token merging inside PatchAlign's tower, and the text-aware patch detector with its
PTA loss inside MergeBridge. Each switch off adds no parameters and changes no bit; each combination counts its
tokens as the config predicts, trains one step, saves and reloads (also as remote code); impossible ones fail at
config time naming both settings."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_merge_bridge import images, make_config, make_model
from test_patch_align import batch, tiny_config
from test_text_guided_bridge import CORPUS, PROMPTS, VISION, question_embeds
from transformers import AutoModelForImageTextToText, AutoModelForPreTraining

from leanvlp import MergeBridgeProcessor
from leanvlp.modeling.modeling_merge_bridge import prompt_embeds
from leanvlp.modeling import configuration_merge_bridge, configuration_patch_align
from leanvlp.modeling.modeling_patch_align import PatchAlignForPreTraining
from leanvlp.modeling.patch_selection import cls_similarity_scores, group_patch_labels, pta_loss
from leanvlp.processing.processing_patch_align import PatchAlignProcessor
from leanvlp.tiny import build_word_tokenizer, tiny_image_processor

# ----------------------------------------------------------------------------- PatchAlign: merging in the tower

# tiny_config: 16 patches + CLS, 4 blocks, detector after block 2 keeping half of what it scores
SCHEDULES = [
    ({"r": 2}, "before_detector", [15, 8, 8, 8]),  # 17 -> 15 -> 13, 12 scored, K=6: CLS + 6 + fused
    ({"r": 2}, "after_detector", [17, 10, 8, 6]),  # 16 scored, K=8: 10, then r=2 twice
    ({"r": 2}, "all", [15, 8, 6, 4]),
    ({"r": [3, 0, 0, 1]}, "all", [14, 8, 8, 7]),  # 13 scored, K=round(6.5)=6
]
KEEP_ALL = ({"r": 2}, "before_detector", [15, 13, 13, 13])  # keep_ratio 1.0: all 12 kept, no fused token


def seeds(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) + 7  # per-sample MLM masks: the same in any process


def patch_align(**overrides) -> PatchAlignForPreTraining:
    torch.manual_seed(0)
    return PatchAlignForPreTraining(tiny_config(**overrides)).eval()


def labels_for(B: int, P: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"patch_labels": (torch.rand(B, P, generator=g) > 0.7).float(),
            "pta_mask": torch.tensor([True, False, True])}


def test_patch_align_merging_off_adds_nothing_and_changes_no_bit():
    base, off = patch_align(), patch_align(vision_merging={"r": 0, "mode": "size_weighted"})
    on = patch_align(vision_merging={"r": 2}, vision_merging_blocks="after_detector")
    assert base.state_dict().keys() == off.state_dict().keys() == on.state_dict().keys()  # merging has no weights
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in base.state_dict().items())
    assert off.config.tower_merging == base.config.tower_merging == {"r": 0, "protected": 1, "prop_attn": True}
    pixels, ids = batch()
    with torch.no_grad():
        torch.manual_seed(1)
        reference = base(pixel_values=pixels, input_ids=ids, sample_seeds=seeds(3), **labels_for(3))
        torch.manual_seed(1)
        same = off(pixel_values=pixels, input_ids=ids, sample_seeds=seeds(3), **labels_for(3))
        torch.manual_seed(1)
        merged = on(pixel_values=pixels, input_ids=ids, sample_seeds=seeds(3), **labels_for(3))
    for name in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_lm", "loss_pta", "patch_scores", "kept_patches"):
        assert torch.equal(getattr(same, name), getattr(reference, name)), name
    assert not torch.equal(merged.loss_itc, reference.loss_itc)  # on: the image tokens change


@pytest.mark.parametrize("merging, blocks, counts, keep_ratio", [(*s, 0.5) for s in SCHEDULES] + [(*KEEP_ALL, 1.0)])
def test_patch_align_token_counts_equal_the_config(merging, blocks, counts, keep_ratio):
    model = patch_align(vision_merging=merging, vision_merging_blocks=blocks,
                        patch_detector=dict(layer=2, keep_ratio=keep_ratio))
    config = model.config
    assert config.vision_token_counts == counts and config.num_image_tokens == counts[-1]
    pixels, _ = batch()
    with torch.no_grad():
        enc = model.patch_align.encode_image(pixels, text_cls=torch.randn(3, 32), output_hidden_states=True)
        pairs = model.patch_align.encode_image_pairs(pixels, torch.tensor([2, 0]), torch.randn(2, 32))
    assert [h.shape[1] for h in enc.hidden_states] == [17, *counts]  # the agnostic branch, block by block
    assert enc.agnostic.shape[1] == enc.aware.shape[1] == pairs.shape[1] == config.num_image_tokens
    assert enc.logits.shape == (3, config.num_detector_tokens) and enc.kept.shape == (3, config.num_kept_patches)


def test_patch_align_pta_labels_follow_the_merged_groups():
    model = patch_align(vision_merging={"r": 2}, vision_merging_blocks="before_detector")
    pixels, ids = batch()
    targets = labels_for(3)
    scored = []  # the detector's logits inside forward (scored with the masked caption's [CLS])
    handle = model.patch_align.detector.register_forward_hook(lambda _m, _a, logits: scored.append(logits))
    with torch.no_grad():
        torch.manual_seed(1)
        out = model(pixel_values=pixels, input_ids=ids, sample_seeds=seeds(3), **targets)
        handle.remove()
        enc = model.patch_align.encode_image(pixels, text_cls=torch.zeros(3, 32))  # merging before it reads no text
    sources = enc.token_sources  # (B, 12, 17): the tokens the detector scored
    assert sources.shape == (3, 12, 17)
    assert torch.equal(sources[:, :, 1:].sum(1), torch.ones(3, 16))  # each patch lies in exactly one token
    by_hand = torch.zeros(3, 12)
    for b in range(3):
        for j in range(12):
            patches = sources[b, j, 1:].nonzero().flatten()
            by_hand[b, j] = float(targets["patch_labels"][b, patches].max())  # relevant if any patch is
    assert torch.equal(group_patch_labels(targets["patch_labels"], sources), by_hand)
    assert (sources[:, :, 1:].sum(-1) > 1).any()  # some tokens hold several patches: the rule is exercised
    assert not torch.equal(by_hand.sum(1), targets["patch_labels"].sum(1))  # grouped labels differ from the grid's
    assert len(scored) == 1 and scored[0].shape == (3, 12)
    assert torch.equal(out.loss_pta, pta_loss(scored[0], by_hand, targets["pta_mask"]))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(vision_merging={"r": 2}, vision_merging_blocks="after_detector", patch_detector={"enabled": False}),
         r"vision_merging_blocks='after_detector' with patch_detector.enabled=False"),
        (dict(vision_merging={"r": 2, "prop_attn": False}),
         r"vision_merging \(mode='size_weighted', prop_attn=False\) with patch_detector.prop_attn=True"),
        (dict(vision_merging={"r": 2, "mode": "mean"}),
         r"vision_merging \(mode='mean', prop_attn=True\) with patch_detector.prop_attn=True"),
        (dict(vision_merging={"r": 1}, semantic_heads={"object_class": {"enabled": True}}),
         r"semantic_heads \(object_class\) reading block 2 with vision_merging r=1"),
        (dict(vision_merging={"r": 1}, vision_merging_blocks="after_detector",
              semantic_heads={"object_class": {"enabled": True}, "layer": "final"}),
         r"semantic_heads \(object_class\) reading block 4 with vision_merging r=1 "
         r"\(vision_merging_blocks='after_detector'\)"),
        (dict(vision_merging={"r": 1, "protected": 0}), r"vision_merging.protected must be 1"),
        (dict(vision_merging={"r": 1, "protect_relevant": 2}), r"vision_merging.protect_relevant=2: .*patch_detector"),
        (dict(vision_merging={"r": [1, 1]}), r"vision_merging: .*2 entries but the model has 4 layers"),
        (dict(vision_merging_blocks="middle"), r"vision_merging_blocks must be one of"),
    ],
)
def test_patch_align_impossible_combinations_fail_at_config_time(settings, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**settings)


def test_patch_align_possible_combinations():
    # heads read block 2 (the detector's), merging only after it; no detector: every block may merge
    config = tiny_config(vision_merging={"r": 2}, vision_merging_blocks="after_detector",
                         semantic_heads={"object_class": {"enabled": True}})
    assert config.vision_token_counts == [17, 10, 8, 6]
    plain = tiny_config(vision_merging={"r": 2, "mode": "mean", "prop_attn": False},
                        patch_detector={"enabled": False})
    assert plain.vision_token_counts == [15, 13, 11, 9] and plain.num_kept_patches == 16
    assert plain.tower_merging["prop_attn"] is False


def test_patch_align_merged_tower_trains_one_step_and_reloads(tmp_path):
    # block 2 merges (before the detector), the heads read block 1's unmerged grid: 17, 15, then CLS + 7 + fused
    model = patch_align(vision_merging={"r": [0, 2, 0, 0]}, vision_merging_blocks="before_detector",
                        semantic_heads={"object_class": {"enabled": True}, "layer": 1}).train()
    assert model.config.vision_token_counts == [17, 9, 9, 9]
    pixels, ids = batch()
    classes = torch.randint(0, 7, (3, 16), generator=torch.Generator().manual_seed(0))
    targets = {**labels_for(3), "class_labels": classes}
    with pytest.raises(ValueError, match=r"semantic_heads \(object_class\) reading block 2"):
        tiny_config(vision_merging={"r": [0, 2, 0, 0]}, vision_merging_blocks="before_detector",
                    semantic_heads={"object_class": {"enabled": True}})  # the default layer is the detector's
    out = model(pixel_values=pixels, input_ids=ids, sample_seeds=seeds(3), **targets)
    assert torch.isfinite(out.loss) and out.loss_pta is not None and out.loss_object_class is not None
    out.loss.backward()
    pa = model.patch_align
    for param in (pa.detector.fc1.weight, pa.vision_tower.vision_model.embeddings.patch_embeddings.projection.weight,
                  model.semantic_heads.object_class.classifier.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval().save_pretrained(tmp_path)
    again = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert again.config.vision_merging == model.config.vision_merging and again.config.vision_merging_blocks == \
        "before_detector"
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(pixel_values=pixels, input_ids=ids, sample_seeds=seeds(3), **targets)
        torch.manual_seed(1)
        second = again(pixel_values=pixels, input_ids=ids, sample_seeds=seeds(3), **targets)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.patch_scores, second.patch_scores)


# ----------------------------------------------------------------------------- MergeBridge: the patch detector

DETECTOR = {"enabled": True, "keep_ratio": 0.25}  # 36 patches -> K = 9: CLS + 9 + fused = 11 bridge inputs
BOXES = [[[0, 0, 20, 20], [24, 30, 10, 10]]] * 2  # xywh on the 48x40 source images
BOX_LABELS = [["circle", "square"]] * 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(CORPUS + ["a red circle"])


GUIDED_SMALL = {"r": 2, "protect_relevant": 2}  # 11 bridge inputs -> 9 -> 7, 2 question-relevant tokens kept


def processor(tokenizer, model, **kw) -> MergeBridgeProcessor:
    return MergeBridgeProcessor(tiny_image_processor(48), tokenizer, num_image_tokens=model.config.num_image_tokens,
                                max_length=model.config.text_config.max_position_embeddings, patch_size=8, **kw)


def test_detector_off_adds_no_parameters_and_changes_no_bit(tokenizer):
    base = make_model(tokenizer, vision_config=VISION)
    off = make_model(tokenizer, vision_config=VISION, patch_detector={**DETECTOR, "enabled": False})
    on = make_model(tokenizer, vision_config=VISION, patch_detector=DETECTOR)
    assert off.model.detector is None and off.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in base.state_dict().items())
    extra = set(on.state_dict()) - set(base.state_dict())
    assert extra and all(k.startswith("model.detector.") for k in extra)
    assert off.config.num_image_tokens == base.config.num_image_tokens != on.config.num_image_tokens
    batch = processor(tokenizer, base)(images=images(2), text=PROMPTS, targets=["a red circle", "blue"],
                                       boxes=BOXES, box_labels=BOX_LABELS)
    with torch.no_grad():
        reference, same = base(**batch), off(**batch)  # patch labels are ignored with the detector off
    assert torch.equal(same.logits, reference.logits) and torch.equal(same.loss, reference.loss)
    assert same.loss_pta is None and same.image_outputs.patch_logits is None


def test_detector_keeps_the_question_relevant_patches_and_counts_follow_the_config(tokenizer):
    model = make_model(tokenizer, vision_config=VISION, patch_detector=DETECTOR, bridge_merging=GUIDED_SMALL)
    config = model.config
    assert (config.num_feature_tokens, config.num_kept_patches, config.num_bridge_input_tokens) == (37, 9, 11)
    assert config.num_image_tokens == 7 and config.bridge_merging_config.token_counts(11, 2) == [9, 7]
    batch = processor(tokenizer, model)(images=images(2), text=PROMPTS, targets=["a red circle", "blue"])
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 2 * config.num_image_tokens
    embeds = model.get_input_embeddings()(batch["input_ids"])
    text = prompt_embeds(embeds, batch["input_ids"] == config.image_token_id, batch["attention_mask"],
                         batch["labels"] == -100)  # the model's text; by hand: the question, targets excluded
    torch.testing.assert_close(text, question_embeds(model, batch), rtol=0, atol=1e-6)  # a mean of fp32 rows
    assert not text[0].any() and text[1].any()  # row 0: captioning (no text), row 1: the question
    with torch.no_grad():
        out = model(**batch).image_outputs
        tracked = model.get_image_features(batch["pixel_values"], text_embeds=text, track_sources=True)
        text_free = model.get_image_features(batch["pixel_values"])
        vision = out.last_hidden_state  # (2, 37, Cv): the tower's features, before the detector
        logits = model.model.detector(vision[:, 1:], text)
    assert torch.equal(out.pooler_output, tracked.pooler_output)
    assert tracked.bridge_sources.shape == (2, config.num_image_tokens, config.num_bridge_input_tokens)
    assert tracked.bridge_token_counts == [9, 7]
    assert out.patch_text_aware.tolist() == [False, True]
    assert torch.equal(out.patch_logits, logits)
    agnostic = cls_similarity_scores(vision)
    for b, scores in ((0, agnostic[0]), (1, logits[1].sigmoid())):  # captioning falls back to CLS similarity
        assert out.kept_patches[b].tolist() == sorted(scores.topk(9).indices.tolist())
    assert torch.equal(text_free.pooler_output[0], out.pooler_output[0])  # the text-free row is the fallback
    # the fused token by hand: the question row weights its dropped patches by softmax(detector logits)
    dropped = sorted(set(range(36)) - set(out.kept_patches[1].tolist()))
    weights = logits[1, dropped].softmax(0)
    fused = (weights[:, None] * vision[1, 1:][dropped]).sum(0)
    with torch.no_grad():
        tokens, _ = model.model.select_patches(vision, text)
    assert tokens.shape == (2, 11, 32)
    torch.testing.assert_close(tokens[1, -1], fused, rtol=1e-5, atol=1e-6)  # a 27-term fp32 weighted sum
    assert torch.equal(tokens[1, 1:10], vision[1, 1:][out.kept_patches[1]])


def test_pta_loss_joins_the_loss_for_question_images_only(tokenizer):
    model = make_model(tokenizer, vision_config=VISION, patch_detector={**DETECTOR, "pta_weight": 0.5})
    proc = processor(tokenizer, model)
    prompts = [PROMPTS[1], ""]  # a question about the square, and a caption
    batch = proc(images=images(2), text=prompts, targets=["blue", "a red circle"], boxes=BOXES, box_labels=BOX_LABELS)
    direct = PatchAlignProcessor(tiny_image_processor(48), tokenizer, patch_size=8)(
        images=images(2), text=[PROMPTS[1], ""], boxes=BOXES, box_labels=BOX_LABELS)
    assert torch.equal(batch["patch_labels"], direct["patch_labels"])  # PatchAlign's box logic, the prompt as text
    assert batch["patch_labels"][0].sum() > 0 and batch["patch_labels"][1].sum() == 0  # only "square" is named
    with torch.no_grad():
        out = model(**batch)
        lm = model(**{k: v for k, v in batch.items() if k not in ("patch_labels", "pta_mask")})
    logits = out.image_outputs.patch_logits
    by_hand = F.binary_cross_entropy_with_logits(logits[0], batch["patch_labels"][0])  # the caption image excluded
    torch.testing.assert_close(out.loss_pta, by_hand, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, lm.loss + 0.5 * out.loss_pta, rtol=0, atol=1e-6)
    assert lm.loss_pta is None
    with pytest.raises(ValueError, match=r"patch_labels of shape \(2, 35\) does not fit 2 images x 36 patches"):
        model(**{**batch, "patch_labels": batch["patch_labels"][:, 1:]})
    with pytest.raises(ValueError, match=r"pta_mask must have shape \(2,\)"):
        model(**{**batch, "pta_mask": batch["pta_mask"][:1]})
    with pytest.raises(ValueError, match="boxes need patch_size"):
        MergeBridgeProcessor(tiny_image_processor(48), tokenizer, num_image_tokens=model.config.num_image_tokens)(
            images=images(2), text=prompts, boxes=BOXES, box_labels=BOX_LABELS)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(patch_detector=DETECTOR, vision_config={**VISION, "model_type": "siglip_vision_model"}),
         r"patch_detector with vision_config.model_type='siglip_vision_model'"),
        (dict(patch_detector=DETECTOR, vision_merging={"r": 2}),
         r"patch_detector with vision_merging r=2: PTA's per-patch labels need the unmerged patch grid"),
        (dict(patch_detector={"enabled": True, "keep_ratio": 0.0}), r"patch_detector.keep_ratio must be in \(0, 1\]"),
        (dict(patch_detector={"enabled": True, "fuse_weights": "mean"}), r"patch_detector.fuse_weights must be one of"),
        (dict(patch_detector={"enabled": "yes"}), r"patch_detector.enabled must be a bool"),
        (dict(patch_detector={"layer": 2}), r"patch_detector: unknown keys \['layer'\]"),
        (dict(patch_detector={"enabled": True, "pta_weight": -1}), r"pta_weight must be a number >= 0"),
    ],
)
def test_detector_impossible_combinations_fail_at_config_time(tokenizer, settings, message):
    settings.setdefault("vision_config", VISION)
    with pytest.raises(ValueError, match=message):
        make_config(tokenizer, **settings)


def test_detector_with_tower_merging_after_the_feature_layer_builds(tokenizer):
    config = make_config(tokenizer, vision_config=VISION, patch_detector=DETECTOR, vision_merging={"r": [0, 2]},
                         vision_feature_layer=1, vision_feature_norm=False)
    assert config.num_feature_tokens == 37 and config.num_bridge_input_tokens == 11
    keep_all = make_model(tokenizer, vision_config=VISION, patch_detector={"enabled": True, "keep_ratio": 1.0})
    assert keep_all.config.num_bridge_input_tokens == 37  # K = P: no fused token
    with torch.no_grad():
        out = keep_all.get_image_features(torch.randn(2, 3, 48, 48), track_sources=True)
    assert out.bridge_sources.shape == (2, keep_all.config.num_image_tokens, 37)


def test_generate_reads_the_question_cached_or_not(tokenizer):
    model = make_model(tokenizer, vision_config=VISION, patch_detector=DETECTOR)
    batch = processor(tokenizer, model)(images=images(2), text=PROMPTS)
    run = dict(max_new_tokens=4, do_sample=False)
    cached = model.generate(**batch, **run)
    assert torch.equal(cached, model.generate(**batch, **run, use_cache=False))  # each step re-reads the prompt only


COMPOSED = dict(vision_config=VISION, freeze_vision=False, bridge_merging=GUIDED_SMALL, patch_detector=DETECTOR,
                semantic_heads={"object_class": {"enabled": True}, "num_classes": 2})


def test_detector_guidance_and_heads_train_one_step_together(tokenizer):
    model = make_model(tokenizer, **COMPOSED).train()
    proc = processor(tokenizer, model, object_classes=["circle", "square"])
    batch = proc(images=images(2), text=PROMPTS[::-1], targets=["blue", "a red circle"], boxes=BOXES,
                 box_labels=BOX_LABELS)
    assert {"patch_labels", "pta_mask", "class_labels"} <= set(batch)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss_pta is not None and set(out.semantic_losses) == {"object_class"}
    out.loss.backward()
    for name in ("model.detector.fc1.weight", "model.detector.fc2.weight", "model.bridge.input_proj.weight",
                 "model.vision_tower.vision_model.embeddings.patch_embeddings.projection.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


REMOTE = textwrap.dedent(
    """
    import sys
    sys.modules["leanvlp"] = None  # remote code only
    import torch
    from transformers import AutoModelForImageTextToText, AutoModelForPreTraining
    bridge = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    align = AutoModelForPreTraining.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
    for model in (bridge, align):
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    bridge_batch, align_batch = torch.load(sys.argv[3], weights_only=True)
    with torch.no_grad():
        out = bridge(**bridge_batch)
        torch.manual_seed(1)
        align_out = align(**align_batch)
    torch.save([out.loss, out.loss_pta, out.logits, align_out.loss, align_out.patch_scores], sys.argv[4])
    """
)


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: about 6 s
def test_save_reload_and_remote_code_keep_both_switches(tokenizer, tmp_path):
    bridge = make_model(tokenizer, **COMPOSED)
    bridge_batch = dict(processor(tokenizer, bridge)(images=images(2), text=PROMPTS, targets=["a red circle", "blue"],
                                                     boxes=BOXES, box_labels=BOX_LABELS))
    align = patch_align(vision_merging={"r": 2}, vision_merging_blocks="before_detector")
    pixels, ids = batch()
    align_batch = {"pixel_values": pixels, "input_ids": ids, "sample_seeds": seeds(3), **labels_for(3)}
    with torch.no_grad():
        out = bridge(**bridge_batch)
        torch.manual_seed(1)
        align_out = align(**align_batch)
    expected = [out.loss, out.loss_pta, out.logits, align_out.loss, align_out.patch_scores]
    bridge.save_pretrained(tmp_path / "bridge")
    align.save_pretrained(tmp_path / "align")
    local = AutoModelForImageTextToText.from_pretrained(tmp_path / "bridge").eval()
    assert local.config.patch_detector == bridge.config.patch_detector
    with torch.no_grad():
        again = local(**bridge_batch)
    assert torch.equal(again.loss, out.loss) and torch.equal(again.loss_pta, out.loss_pta)
    torch.save([bridge_batch, align_batch], tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path / "bridge"), str(tmp_path / "align"),
                             str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(remote, expected))


def test_processor_saves_its_patch_size(tokenizer, tmp_path):
    model = make_model(tokenizer, vision_config=VISION, patch_detector=DETECTOR)
    proc = processor(tokenizer, model)
    proc.save_pretrained(tmp_path)
    again = MergeBridgeProcessor.from_pretrained(tmp_path)
    assert again.patch_size == 8 and again.num_image_tokens == model.config.num_image_tokens


@pytest.mark.parametrize("module", [configuration_patch_align, configuration_merge_bridge])
def test_config_docstring_examples_run(module):
    config_class = module.PatchAlignConfig if module is configuration_patch_align else module.MergeBridgeConfig
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(config_class, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 4


def test_speed_evaluator_counts_the_detector_tokens(tokenizer):
    """eval.py's speed task predicts every stage's tokens from the config: with the detector on, the bridge reads
    CLS + K + the fused token, not the tower's output."""
    from leanvlp.evaluation.families import MergeBridgeEvaluator

    model = make_model(tokenizer, vision_config=VISION, patch_detector=DETECTOR, bridge_merging=GUIDED_SMALL).eval()
    evaluator = MergeBridgeEvaluator(model, processor(tokenizer, model))
    with torch.no_grad():
        measured = evaluator.measured_tokens(evaluator.batch(images(2), ["a red circle", "blue"]))
    assert measured == evaluator.derived_tokens()
    assert (measured["vision_out"], measured["bridge_in"], measured["bridge"]) == (37, 11, [9, 7])
