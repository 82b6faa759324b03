"""MergeBridge composition switches: the semantic heads as auxiliary losses, and impossible combinations."""

from __future__ import annotations

import pytest
import torch
from test_merge_bridge import images, make_config, make_model
from test_text_guided_bridge import GUIDED, VISION, batch_for
from transformers import AutoModelForImageTextToText

from leanvlp.processing.processing_patch_align import PatchAlignProcessor
from leanvlp.tiny import build_word_tokenizer, tiny_image_processor

CORPUS = ["a red circle to the left of a small blue square", "question: what colour is the square? short answer:"]
CLASSES, ATTRIBUTES = ["circle", "square"], ["red", "blue"]
HEADS = {"object_class": {"enabled": True, "weight": 0.5}, "attribute": {"enabled": True},
         "region_feature": {"enabled": True, "loss": "cosine"}, "num_classes": 2, "num_attributes": 2,
         "teacher_size": 4}


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(CORPUS)


def box_targets(tokenizer, n: int) -> dict[str, torch.Tensor]:
    """Per-patch targets from boxes, built the way PatchAlign builds them (48 px images, 8 px patches)."""
    proc = PatchAlignProcessor(tiny_image_processor(48), tokenizer, patch_size=8, object_classes=CLASSES,
                               attributes=ATTRIBUTES)
    boxes = [[[0, 0, 20, 20], [24, 30, 10, 10]]] * n  # xywh on the 48x40 source images
    out = proc(images=images(n), text=["a red circle"] * n, boxes=boxes, box_labels=[["circle", "square"]] * n,
               box_attributes=[[["red"], ["blue"]]] * n, box_features=[[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]] * n)
    return {k: v for k, v in out.items() if k not in ("pixel_values", "input_ids", "attention_mask",
                                                      "token_type_ids", "patch_labels", "pta_mask")}


def test_heads_off_add_no_parameters_and_change_no_bit(tokenizer):
    base = make_model(tokenizer, vision_config=VISION, freeze_vision=False)
    off = make_model(tokenizer, vision_config=VISION, freeze_vision=False,
                     semantic_heads={**HEADS, **{h: {"enabled": False} for h in ("object_class", "attribute",
                                                                                 "region_feature")}})
    on = make_model(tokenizer, vision_config=VISION, freeze_vision=False, semantic_heads=HEADS)
    assert off.semantic_heads is None and off.state_dict().keys() == base.state_dict().keys()
    extra = set(on.state_dict()) - set(base.state_dict())
    assert extra and all(k.startswith("semantic_heads.") for k in extra)
    batch = batch_for(tokenizer, base, targets=["a red circle", "blue"])
    with torch.no_grad():
        reference = base(**batch)
        for model in (off, on):  # the heads read the patches; without head targets nothing else changes
            out = model(**batch)
            assert torch.equal(out.logits, reference.logits) and torch.equal(out.loss, reference.loss)
            assert out.semantic_losses is None


def test_heads_train_the_tower_with_text_guided_merging_and_reload(tokenizer, tmp_path):
    model = make_model(tokenizer, vision_config=VISION, freeze_vision=False, semantic_heads=HEADS,
                       bridge_merging=GUIDED)
    batch = {**batch_for(tokenizer, model, targets=["a red circle", "blue"]), **box_targets(tokenizer, 2)}
    assert batch["class_labels"].shape == (2, 36) and (batch["class_labels"] < 2).any()
    with torch.no_grad():  # eval: no dropout, so both forwards compute the same LM loss
        out = model(**batch)
        lm = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "labels")})
    assert set(out.semantic_losses) == {"object_class", "attribute", "region_feature"}
    expected = lm.loss + 0.5 * out.semantic_losses["object_class"] + out.semantic_losses["attribute"] \
        + out.semantic_losses["region_feature"]
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)  # the same fp32 sum, maybe reassociated
    out = model.train()(**batch)
    out.loss.backward()
    tower = model.vision_tower.vision_model.embeddings.patch_embeddings.projection.weight
    assert tower.grad is not None and tower.grad.abs().sum() > 0
    assert model.semantic_heads.object_class.classifier.weight.grad.abs().sum() > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval().save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert again.config.semantic_heads == model.config.semantic_heads
    with torch.no_grad():
        first, second = model(**batch), again(**batch)
    assert torch.equal(first.loss, second.loss)
    assert all(torch.equal(first.semantic_losses[k], second.semantic_losses[k]) for k in first.semantic_losses)


def test_head_targets_must_fit_the_patch_grid_and_need_images(tokenizer):
    model = make_model(tokenizer, vision_config=VISION, freeze_vision=False, semantic_heads=HEADS)
    batch = batch_for(tokenizer, model)
    with pytest.raises(ValueError, match=r"class_labels of shape \(2, 35\) does not fit 2 images x 36 patches"):
        model(**batch, class_labels=torch.zeros(2, 35, dtype=torch.long))
    with pytest.raises(ValueError, match="semantic-head targets need images"):
        model(input_ids=batch["input_ids"], class_labels=torch.zeros(2, 36, dtype=torch.long))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(semantic_heads=HEADS, freeze_vision=True), r"semantic_heads \(object_class, attribute, region_feature\) "
                                                         r"with freeze_vision=True"),
        (dict(semantic_heads=HEADS, freeze_vision=False, vision_merging={"r": 2}),
         r"semantic_heads \(.*\) with vision_merging r=2"),
        (dict(semantic_heads={"object_class": {"enabled": True}}, freeze_vision=False),
         r"semantic_heads.object_class is enabled but num_classes=0"),
        (dict(semantic_heads={"objects": {}}), r"semantic_heads: unknown keys \['objects'\]"),
        (dict(semantic_heads={**HEADS, "region_feature": {"enabled": True, "loss": "l2"}}, freeze_vision=False),
         r"region_feature.loss must be 'smooth_l1' or 'cosine', got 'l2'"),
        (dict(bridge_merging={"r": 6, "protect_relevant": 10}), r"bridge_merging: .*protect_relevant=10"),
    ],
)
def test_impossible_combinations_fail_at_config_time_naming_both(tokenizer, settings, message):
    with pytest.raises(ValueError, match=message):
        make_config(tokenizer, vision_config=VISION, **settings)


def test_possible_combinations_build(tokenizer):
    # heads with merging after the feature layer, video with bridge guidance: both fine
    config = make_config(tokenizer, vision_config=VISION, semantic_heads=HEADS, freeze_vision=False,
                         bridge_merging=GUIDED, vision_merging={"r": [0, 2]}, vision_feature_layer=1,
                         vision_feature_norm=False)
    assert config.semantic_heads_enabled and config.text_guided
    video = make_config(tokenizer, vision_config=VISION, temporal_merging=True, bridge_merging=GUIDED,
                        temporal_dim=16, temporal_heads=2)
    model = make_model(tokenizer, **{k: v for k, v in video.to_dict().items() if k in (
        "vision_config", "temporal_merging", "bridge_merging", "temporal_dim", "temporal_heads")})
    text = torch.randn(1, 32)
    with torch.no_grad():
        out = model.get_image_features(torch.randn(1, 2, 3, 48, 48), text_embeds=text)
    assert out.pooler_output.shape[1] == video.num_image_tokens
