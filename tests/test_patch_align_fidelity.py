"""PatchAlign fidelity options (issue #15): ITM / retrieval re-ranking through the text-aware detector, the fused
token's weights from the detector's logits, and the layer the semantic heads read. Tiny random configs, CPU."""

import pytest
import torch

from leanvlp.modeling.configuration_patch_align import PatchAlignConfig
from leanvlp.modeling.modeling_patch_align import (
    PatchAlignForImageTextRetrieval,
    PatchAlignForPreTraining,
    PatchAlignModel,
)
from leanvlp.modeling.patch_selection import PatchSelectionHook

V, DEPTH = 40, 4  # vocabulary: 0 pad, 1 [CLS], 2 [SEP], 3 [MASK]; vision blocks


def config(detector: dict | None = None, **overrides) -> PatchAlignConfig:
    kw = dict(
        vision_config=dict(model_type="vit", hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=8),
        text_config=dict(model_type="bert", vocab_size=V, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                         initializer_range=0.2),  # BERT's 0.02 leaves a random ITM head nearly image-blind
        num_fusion_layers=1, num_decoder_layers=1, embed_dim=16, cls_token_id=1, sep_token_id=2, mask_token_id=3,
        patch_detector=dict(layer=2, keep_ratio=0.5, **(detector or {})),
        object_classes=["circle", "square", "star"], attributes=["red", "blue"], teacher_size=8,
    )
    kw.update(overrides)
    return PatchAlignConfig(**kw)


def inputs(B: int = 3, T: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, T), generator=g)
    ids[:, 0] = 1
    return torch.randn(B, 3, 32, 32, generator=g), ids


def twin(cls: type, **detector):
    """The same weights with itm_text_aware off and on."""
    torch.manual_seed(0)
    off = cls(config(detector)).eval()
    on = cls(config({**detector, "itm_text_aware": True})).eval()
    on.load_state_dict(off.state_dict())
    return off, on


def aware_one_by_one(pa: PatchAlignModel, pixels: torch.Tensor, rows: torch.Tensor, text_cls: torch.Tensor):
    """Oracle: each pair's image pruned alone with its text through the MLM / VQA path (encode_image's .aware)."""
    return torch.cat([pa.encode_image(pixels[r:r + 1], text_cls=text_cls[j:j + 1]).aware
                      for j, r in enumerate(rows.tolist())])


# ----------------------------------------------------------------------------- config


def test_defaults_and_round_trip(tmp_path):
    cfg = config()
    assert cfg.patch_detector["itm_text_aware"] is False and cfg.patch_detector["fuse_weights"] == "logits"
    assert cfg.semantic_heads["layer"] is None and cfg.heads_layer == 2
    cfg = config(dict(itm_text_aware=True, fuse_weights="scores"), semantic_heads=dict(layer="final"))
    cfg.save_pretrained(tmp_path)
    loaded = PatchAlignConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == cfg.to_dict() and loaded.heads_layer == DEPTH
    assert loaded.patch_detector["itm_text_aware"] is True and loaded.patch_detector["fuse_weights"] == "scores"


@pytest.mark.parametrize(
    "detector,overrides,match",
    [
        (dict(fuse_weights="probs"), {}, r"patch_detector.fuse_weights.*\('logits', 'scores'\).*'probs'"),
        (dict(itm_text_aware="yes"), {}, r"patch_detector.itm_text_aware must be a bool.*'yes'"),
        ({}, dict(semantic_heads=dict(layer="last")), r"semantic_heads.layer.*or 'final'.*got 'last'"),
    ],
)
def test_bad_fidelity_options_are_named(detector, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(detector, **overrides)


# ----------------------------------------------------------------------------- ITM through the text-aware path


def test_itm_off_equals_the_text_agnostic_path():
    """Default: every ITM pair (positives, hard texts, hard images) reads the text-agnostic image tokens."""
    model = PatchAlignForPreTraining(config()).eval()
    pixels, ids = inputs()
    with torch.no_grad():
        torch.manual_seed(1)
        out = model(pixel_values=pixels, input_ids=ids)
        pa = model.patch_align
        text, mask = pa.encode_text(ids), torch.ones_like(ids)
        agnostic = pa.encode_image(pixels).agnostic
        nt, ni = out.itm_negative_texts, out.itm_negative_images
        texts, masks = torch.cat([text, text[nt], text]), torch.cat([mask, mask[nt], mask])
        images = torch.cat([agnostic, agnostic, agnostic[ni]])
        expected = model.itm_head(pa.fuse(texts, masks, images)[:, 0])
    torch.testing.assert_close(out.itm_logits, expected, rtol=1e-5, atol=1e-6)


def test_itm_text_aware_prunes_each_pairs_image_with_that_pairs_text():
    """On: pair (image i, text j) reads image i pruned by the detector with text j's [CLS], the same tokens the
    MLM / VQA path builds for that one pair; the logits differ from the agnostic path's on the same pairs."""
    off, on = twin(PatchAlignForPreTraining)
    pixels, ids = inputs()
    with torch.no_grad():
        torch.manual_seed(1)
        got = on(pixel_values=pixels, input_ids=ids)
        torch.manual_seed(1)
        base = off(pixel_values=pixels, input_ids=ids)
        assert torch.equal(got.itm_negative_texts, base.itm_negative_texts)  # same pairs: same hard negatives
        assert torch.equal(got.itm_negative_images, base.itm_negative_images)
        pa = on.patch_align
        text, mask = pa.encode_text(ids), torch.ones_like(ids)
        nt, ni = got.itm_negative_texts, got.itm_negative_images
        texts, masks = torch.cat([text, text[nt], text]), torch.cat([mask, mask[nt], mask])
        rows = torch.cat([torch.arange(3), torch.arange(3), ni])
        images = aware_one_by_one(pa, pixels, rows, texts[:, 0])
        expected = on.itm_head(pa.fuse(texts, masks, images)[:, 0])
    torch.testing.assert_close(got.itm_logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.itm_logits, base.itm_logits, atol=1e-4)


def test_text_aware_pair_tokens_change_when_the_text_changes_and_gradients_reach_the_detector():
    off, on = twin(PatchAlignForPreTraining)
    pixels, ids = inputs()
    pa = on.patch_align
    text_cls = pa.encode_text(ids)[:, 0]
    pair = pa.encode_image_pairs(pixels, torch.tensor([0, 0, 0]), text_cls)  # image 0 with three texts
    assert pair.shape == (3, 1 + 8 + 1, 32)
    assert not torch.allclose(pair[0], pair[1]) and not torch.allclose(pair[0], pair[2])
    torch.manual_seed(1)
    out = on(pixel_values=pixels, input_ids=ids)
    out.loss_itm.backward()
    assert pa.detector.fc1.weight.grad is not None and pa.detector.fc1.weight.grad.abs().sum() > 0
    torch.manual_seed(1)
    off(pixel_values=pixels, input_ids=ids).loss_itm.backward()
    grad = off.patch_align.detector.fc1.weight.grad  # the agnostic path never calls the detector
    assert grad is None or grad.abs().sum() == 0


def test_detector_off_makes_itm_text_aware_a_no_op():
    off, on = twin(PatchAlignForPreTraining, enabled=False)
    pixels, ids = inputs()
    with torch.no_grad():
        torch.manual_seed(1)
        a = off(pixel_values=pixels, input_ids=ids).itm_logits
        torch.manual_seed(1)
        b = on(pixel_values=pixels, input_ids=ids).itm_logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        pa = on.patch_align
        pairs = pa.encode_image_pairs(pixels, torch.tensor([2, 0]), pa.encode_text(ids[:2])[:, 0])
        torch.testing.assert_close(pairs, pa.encode_image(pixels).agnostic[[2, 0]], rtol=0, atol=0)


def test_retrieval_reranking_through_the_text_aware_detector():
    off, on = twin(PatchAlignForImageTextRetrieval)
    pixels, ids = inputs(B=3)
    ids = torch.cat([ids, inputs(B=1, seed=5)[1]])  # 3 images, 4 texts
    with torch.no_grad():
        got, base = on(pixel_values=pixels, input_ids=ids, k=2), off(pixel_values=pixels, input_ids=ids, k=2)
        torch.testing.assert_close(got.itc_scores, base.itc_scores, rtol=0, atol=0)  # ITC stays text-agnostic
        pa = on.patch_align
        text = pa.encode_text(ids)
        for name, rows_are_images in (("i2t_scores", True), ("t2i_scores", False)):
            scores = getattr(got, name)
            assert torch.equal(scores.isfinite(), getattr(base, name).isfinite())  # the same ITC top-k
            r, c = scores.isfinite().nonzero().unbind(1)
            i, j = (r, c) if rows_are_images else (c, r)
            images = aware_one_by_one(pa, pixels, i, text[j, 0])
            probs = on.itm_head(pa.fuse(text[j], torch.ones_like(ids)[j], images)[:, 0]).softmax(-1)[:, 1]
            torch.testing.assert_close(scores[r, c], probs, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(scores[r, c], getattr(base, name)[r, c], atol=1e-5)


# ----------------------------------------------------------------------------- fused token weights in the model


@pytest.mark.parametrize("mode", ["logits", "scores"])
def test_text_aware_branch_fuses_with_the_configured_weights(mode):
    """encode_image's text-aware tokens equal the tower run with a hook that fuses by softmax(logits) or by
    softmax(sigmoid(logits)); the text-agnostic tokens do not depend on the option."""
    torch.manual_seed(0)
    model = PatchAlignModel(config(dict(fuse_weights=mode))).eval()
    pixels, ids = inputs()
    with torch.no_grad():
        text_cls = model.encode_text(ids)[:, 0]
        enc = model.encode_image(pixels, text_cls=text_cls)
        refs = {}
        for m in ("logits", "scores"):
            hook = PatchSelectionHook(1, 0.5, model.detector, text=text_cls, fuse_weights=m)
            refs[m] = model.vision_tower(pixels, hooks=[hook]).last_hidden_state
        agnostic = model.vision_tower(pixels, hooks=[PatchSelectionHook(1, 0.5)]).last_hidden_state
    torch.testing.assert_close(enc.aware, refs[mode], rtol=1e-5, atol=1e-5)
    other = "scores" if mode == "logits" else "logits"
    assert not torch.allclose(enc.aware, refs[other], atol=1e-4)
    torch.testing.assert_close(enc.agnostic, agnostic, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the layer the heads read

HEADS = dict(object_class=dict(enabled=True), attribute=dict(enabled=True), region_feature=dict(enabled=True))


def head_targets(B: int = 3, P: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        class_labels=torch.randint(0, 4, (B, P), generator=g),
        attribute_labels=(torch.rand(B, P, 2, generator=g) > 0.5).float(),
        attribute_mask=torch.rand(B, P, generator=g) > 0.3,
        region_box_masks=torch.rand(B, 2, P, generator=g) > 0.5,
        region_features=torch.randn(B, 2, 8, generator=g),
        region_mask=torch.ones(B, 2, dtype=torch.bool),
    )


@pytest.mark.parametrize("layer", [None, 1, "final"])
def test_heads_read_the_configured_block(layer):
    """None: the detector's block (full grid); an int: that block; "final": the last block's text-agnostic
    kept patches, scored against the targets at their grid positions."""
    torch.manual_seed(0)
    model = PatchAlignForPreTraining(config(semantic_heads=dict(HEADS, layer=layer))).eval()
    pixels, ids = inputs()
    t = head_targets()
    pa = model.patch_align
    with torch.no_grad():
        torch.manual_seed(1)
        out = model(pixel_values=pixels, input_ids=ids, **t)
        hook = PatchSelectionHook(1, 0.5)
        pruned = pa.vision_tower(pixels, hooks=[hook], output_hidden_states=True).hidden_states  # embeddings first
        grid = pa.vision_tower(pixels, output_hidden_states=True).hidden_states  # blocks up to the detector's
        block = {None: 2, 1: 1, "final": DEPTH}[layer]
        assert model.config.heads_layer == block
        patches = (pruned if layer == "final" else grid)[block][:, 1:]
        if layer == "final":  # CLS + K kept + fused: the kept ones, targets taken at their grid positions
            patches, idx = patches[:, :8], hook.kept
            t = dict(t, class_labels=t["class_labels"].gather(1, idx),
                     attribute_labels=torch.stack([t["attribute_labels"][b, idx[b]] for b in range(3)]),
                     attribute_mask=t["attribute_mask"].gather(1, idx),
                     region_box_masks=torch.stack([t["region_box_masks"][b][:, idx[b]] for b in range(3)]))
        else:
            assert patches.shape == (3, 16, 32)
        expected = model.semantic_heads(patches, **t)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, f"loss_{name}"), value, rtol=1e-5, atol=1e-6)


def test_final_layer_without_a_detector_is_the_default_full_grid():
    torch.manual_seed(0)
    default = PatchAlignForPreTraining(config(dict(enabled=False), semantic_heads=HEADS)).eval()
    final = PatchAlignForPreTraining(config(dict(enabled=False), semantic_heads=dict(HEADS, layer="final"))).eval()
    final.load_state_dict(default.state_dict())
    pixels, ids = inputs()
    with torch.no_grad():
        a = default.patch_align.encode_image(pixels, want_patches=True)
        b = final.patch_align.encode_image(pixels, want_patches=True)
    assert a.patches.shape == (3, 16, 32) and b.patch_index is None
    torch.testing.assert_close(a.patches, b.patches, rtol=0, atol=0)
