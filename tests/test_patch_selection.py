"""Text-aware patch detector: top-K selection, score-weighted fusion, block-loop hook, PTA loss."""

import pytest
import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from leanvlp.modeling.patch_selection import (
    PatchSelectionHook,
    TextAwarePatchDetector,
    cls_similarity_scores,
    num_kept_patches,
    pta_loss,
    select_and_fuse,
)
from leanvlp.modeling.token_merging import (
    BertLayerAdapter,
    MergeState,
    TokenMergingConfig,
    run_token_merging,
)


def test_select_and_fuse_by_hand():
    hidden = torch.arange(6 * 2, dtype=torch.float32).view(1, 6, 2)  # CLS + 5 patches
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2]])
    sizes = torch.tensor([[[1.0], [1.0], [2.0], [1.0], [3.0], [1.0]]])
    sources = torch.eye(6).view(1, 6, 6)
    out, new_sizes, new_sources, kept = select_and_fuse(hidden, scores, 2, sizes, sources)
    assert kept.tolist() == [[1, 3]]  # patches 1 and 3, spatial order
    assert out.shape == (1, 4, 2)  # CLS + K + fused
    torch.testing.assert_close(out[0, :3], hidden[0, [0, 2, 4]])
    w = torch.softmax(torch.tensor([0.1, 0.3, 0.2]), 0)  # dropped patches 0, 2, 4 -> tokens 1, 3, 5
    torch.testing.assert_close(out[0, 3], (w[:, None] * hidden[0, [1, 3, 5]]).sum(0))
    assert new_sizes[0, :, 0].tolist() == [1.0, 2.0, 3.0, 1.0 + 1.0 + 1.0]
    assert new_sizes.sum() == sizes.sum()
    assert new_sources[0, 3].tolist() == [0, 1, 0, 1, 0, 1]


def test_num_kept_and_bad_keep_ratio():
    assert num_kept_patches(196, 0.5) == 98 and num_kept_patches(196, 1.0) == 196
    assert num_kept_patches(4, 0.01) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"keep_ratio.*{bad}"):
            num_kept_patches(196, bad)


def _bert_layers(n: int = 4, hidden: int = 32) -> torch.nn.ModuleList:
    cfg = BertConfig(hidden_size=hidden, num_attention_heads=4, intermediate_size=64, attn_implementation="sdpa")
    return torch.nn.ModuleList([BertLayer(cfg) for _ in range(n)]).eval()


@pytest.mark.parametrize("keep_ratio,expected", [(0.5, 8), (0.25, 4), (0.7, 11)])
def test_after_block_k_exactly_k_plus_2_tokens(keep_ratio, expected):
    layers, x = _bert_layers(), torch.randn(2, 17, 32)  # CLS + 16 patches
    detector = TextAwarePatchDetector(32, 12)
    hook = PatchSelectionHook(1, keep_ratio, detector, text=torch.randn(2, 12))
    out = run_token_merging(layers, BertLayerAdapter(), TokenMergingConfig(), x, hooks=[hook], track_sources=True)
    assert out.token_counts == [17, expected + 2, expected + 2, expected + 2]
    assert hook.kept.shape == (2, expected) and hook.logits.shape == (2, 16)
    assert torch.equal(out.sizes.sum(1), torch.full((2, 1), 17.0))
    torch.testing.assert_close(out.sources.sum(-1, keepdim=True), out.sizes)


def test_keep_ratio_one_equals_unpruned_exactly():
    layers, x = _bert_layers(), torch.randn(2, 17, 32)
    plain = run_token_merging(layers, BertLayerAdapter(), TokenMergingConfig(), x)
    for text in (torch.randn(2, 12), None):  # text-aware and text-agnostic
        hook = PatchSelectionHook(1, 1.0, TextAwarePatchDetector(32, 12), text=text)
        out = run_token_merging(layers, BertLayerAdapter(), TokenMergingConfig(), x, hooks=[hook])
        assert out.token_counts == [17] * 4
        assert torch.equal(out.last_hidden_state, plain.last_hidden_state)


def test_text_agnostic_mode_ignores_text_and_uses_cls_similarity():
    hidden = torch.randn(3, 9, 16)
    hook = PatchSelectionHook(0, 0.5)
    out, state = hook.after_block(0, hidden, MergeState(sizes=torch.ones(3, 9, 1)))
    torch.testing.assert_close(hook.scores, cls_similarity_scores(hidden))
    assert out.shape == (3, 1 + 4 + 1, 16) and hook.logits is None
    assert state.sizes[:, :, 0].tolist() == [[1, 1, 1, 1, 1, 4]] * 3


def test_text_changes_the_selection():
    torch.manual_seed(1)
    detector = TextAwarePatchDetector(16, 8)
    patches = torch.randn(1, 32, 16)
    a, b = detector(patches, torch.randn(1, 8) * 5), detector(patches, torch.randn(1, 8) * 5)
    assert not torch.equal(a.topk(16).indices.sort().values, b.topk(16).indices.sort().values)


def test_pta_loss_masks_unannotated_samples_without_dilution():
    logits = torch.randn(4, 10, requires_grad=True)
    labels = (torch.rand(4, 10) > 0.5).float()
    mask = torch.tensor([True, False, True, False])
    loss = pta_loss(logits, labels, mask)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], labels[mask])
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert logits.grad[~mask].abs().sum() == 0
    assert pta_loss(logits, labels, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_detector_gets_gradient_through_the_fused_token():
    layers, x = _bert_layers(2), torch.randn(2, 17, 32)
    detector = TextAwarePatchDetector(32, 12)
    hook = PatchSelectionHook(0, 0.5, detector, text=torch.randn(2, 12))
    run_token_merging(layers, BertLayerAdapter(), TokenMergingConfig(), x, hooks=[hook]).last_hidden_state.sum().backward()
    assert detector.fc1.weight.grad is not None and detector.fc1.weight.grad.abs().sum() > 0


def test_fused_token_weights_are_the_softmax_of_the_logits_of_the_dropped_patches_by_hand():
    """fuse_weights="logits" (default): fused = sum_i softmax(z)_i x_i over the non-kept patches; "scores" puts
    sigmoid(z) into the softmax instead (today's earlier behaviour). The kept set is the same either way."""
    torch.manual_seed(0)
    detector = TextAwarePatchDetector(16, 8)
    hidden, text = torch.randn(2, 1 + 10, 16), torch.randn(2, 8) * 3  # CLS + 10 patches
    fused, kept = {}, {}
    for mode in ("logits", "scores"):
        hook = PatchSelectionHook(0, 0.4, detector, text=text, fuse_weights=mode)
        out, _ = hook.after_block(0, hidden, MergeState())
        assert out.shape == (2, 1 + 4 + 1, 16)
        fused[mode], kept[mode] = out[:, -1], hook.kept
    assert torch.equal(kept["logits"], kept["scores"])
    with torch.no_grad():
        z = detector(hidden[:, 1:], text)  # (2, 10)
    for b in range(2):
        dropped = [i for i in range(10) if i not in kept["logits"][b].tolist()]
        x = hidden[b, 1:][dropped]  # (6, 16)
        by_hand = {"logits": z[b, dropped].softmax(0), "scores": z[b, dropped].sigmoid().softmax(0)}
        for mode, w in by_hand.items():
            torch.testing.assert_close(fused[mode][b], (w[:, None] * x).sum(0))
    assert not torch.allclose(fused["logits"], fused["scores"])


def test_rows_pair_each_text_with_its_image_row():
    """rows (n,): text j prunes batch row rows[j]; equal to pruning that row alone with that text."""
    torch.manual_seed(0)
    detector = TextAwarePatchDetector(16, 8)
    hidden, text = torch.randn(2, 9, 16), torch.randn(3, 8) * 3
    rows = torch.tensor([1, 0, 1])
    sizes = torch.rand(2, 9, 1) + 1
    hook = PatchSelectionHook(0, 0.5, detector, text=text, rows=rows)
    out, state = hook.after_block(0, hidden, MergeState(sizes=sizes))
    assert out.shape == (3, 1 + 4 + 1, 16) and state.sizes.shape == (3, 6, 1)
    for j, r in enumerate(rows.tolist()):
        alone = PatchSelectionHook(0, 0.5, detector, text=text[j:j + 1])
        ref, ref_state = alone.after_block(0, hidden[r:r + 1], MergeState(sizes=sizes[r:r + 1]))
        torch.testing.assert_close(out[j:j + 1], ref, rtol=0, atol=0)
        torch.testing.assert_close(state.sizes[j:j + 1], ref_state.sizes, rtol=0, atol=0)
        assert torch.equal(hook.kept[j:j + 1], alone.kept)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fuse_weights="sigmoid"), r"fuse_weights.*'sigmoid'"),
        (dict(rows=torch.tensor([0, 1])), r"rows needs text, one row index per text.*\(2,\).*\(3, 8\)"),
        (dict(selection="cls"), r"selection must be one of \('detector', 'cls_cosine', 'random'\), got 'cls'"),
    ],
)
def test_bad_hook_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatchSelectionHook(0, 0.5, TextAwarePatchDetector(16, 8), text=torch.randn(3, 8), **kwargs)


# ----------------------------------------------------------------------------- selection ablations (issue #15 b)


def test_cls_cosine_selection_equals_the_text_agnostic_branch_and_the_detector_still_scores():
    """selection="cls_cosine": the text-aware hook keeps and fuses exactly as the text-agnostic one, whatever the
    text; the detector's logits are still computed (for PTA) but decide nothing."""
    torch.manual_seed(0)
    detector = TextAwarePatchDetector(16, 8)
    hidden, sizes = torch.randn(2, 1 + 10, 16), torch.rand(2, 11, 1) + 1
    agnostic = PatchSelectionHook(0, 0.4)
    ref, ref_state = agnostic.after_block(0, hidden, MergeState(sizes=sizes))
    for text in (torch.randn(2, 8) * 3, torch.randn(2, 8) * 3):
        hook = PatchSelectionHook(0, 0.4, detector, text=text, selection="cls_cosine")
        out, state = hook.after_block(0, hidden, MergeState(sizes=sizes))
        assert torch.equal(out, ref) and torch.equal(state.sizes, ref_state.sizes)
        assert torch.equal(hook.kept, agnostic.kept) and torch.equal(hook.scores, agnostic.scores)
        torch.testing.assert_close(hook.logits, detector(hidden[:, 1:], text), rtol=0, atol=0)


def test_random_selection_keeps_the_top_k_of_uniform_draws_and_fuses_by_their_softmax():
    """selection="random": scores are torch.rand draws of the global generator (same seed, same selection); the
    kept set is their top K in spatial order and the fused token the softmax(scores)-weighted dropped patches."""
    torch.manual_seed(0)
    detector = TextAwarePatchDetector(16, 8)
    hidden, text = torch.randn(2, 1 + 10, 16), torch.randn(2, 8)
    kept = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws = torch.rand(2, 10)
        torch.manual_seed(seed)
        hook = PatchSelectionHook(0, 0.4, detector, text=text, selection="random")
        out, _ = hook.after_block(0, hidden, MergeState())
        assert torch.equal(hook.scores, draws) and hook.logits.shape == (2, 10)
        assert torch.equal(hook.kept, draws.topk(4, dim=1).indices.sort(dim=1).values)
        for b in range(2):
            dropped = [i for i in range(10) if i not in hook.kept[b].tolist()]
            w = draws[b, dropped].softmax(0)
            torch.testing.assert_close(out[b, -1], (w[:, None] * hidden[b, 1:][dropped]).sum(0))
        kept.append(hook.kept)
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])


def test_ablated_selection_gives_the_detector_no_gradient_from_the_tokens():
    """With cls_cosine / random ranking the detector is off the token path: only PTA (on its logits) trains it."""
    layers, x = _bert_layers(2), torch.randn(2, 17, 32)
    for selection in ("cls_cosine", "random"):
        detector = TextAwarePatchDetector(32, 12)
        hook = PatchSelectionHook(0, 0.5, detector, text=torch.randn(2, 12), selection=selection)
        out = run_token_merging(layers, BertLayerAdapter(), TokenMergingConfig(), x, hooks=[hook]).last_hidden_state
        out.sum().backward(retain_graph=True)  # PTA below reads the same blocks
        assert detector.fc1.weight.grad is None
        pta_loss(hook.logits, torch.ones(2, 16), torch.ones(2, dtype=torch.bool)).backward()
        assert detector.fc1.weight.grad.abs().sum() > 0


def _patch_align_config(**detector):
    from leanvlp.modeling.configuration_patch_align import PatchAlignConfig

    return PatchAlignConfig(
        vision_config=dict(model_type="vit", hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=8),
        text_config=dict(model_type="bert", vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, initializer_range=0.2),
        num_fusion_layers=1, num_decoder_layers=1, embed_dim=16, cls_token_id=1, sep_token_id=2, mask_token_id=3,
        patch_detector=dict(layer=2, keep_ratio=0.5, **detector),
    )


def test_selection_config_default_round_trip_and_bad_value(tmp_path):
    from leanvlp.modeling.configuration_patch_align import PatchAlignConfig

    assert _patch_align_config().patch_detector["selection"] == "detector"
    _patch_align_config(selection="random").save_pretrained(tmp_path)
    assert PatchAlignConfig.from_pretrained(tmp_path).patch_detector["selection"] == "random"
    with pytest.raises(ValueError, match=r"patch_detector.selection must be one of .*got 'top_k'"):
        _patch_align_config(selection="top_k")


def test_model_text_aware_paths_follow_the_selection():
    """In PatchAlign, cls_cosine makes the text-aware branch (MLM, VQA) and encode_image_pairs (text-aware ITM)
    equal the text-agnostic tokens exactly; PTA still trains the detector; `scores` are what ranked the patches."""
    from leanvlp.modeling.modeling_patch_align import PatchAlignForPreTraining

    torch.manual_seed(0)
    models = {sel: PatchAlignForPreTraining(_patch_align_config(selection=sel)).eval()
              for sel in ("detector", "cls_cosine")}
    models["cls_cosine"].load_state_dict(models["detector"].state_dict())
    g = torch.Generator().manual_seed(0)
    pixels, text_cls = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 32, generator=g) * 3
    with torch.no_grad():
        det = models["detector"].patch_align.encode_image(pixels, text_cls=text_cls)
        cos = models["cls_cosine"].patch_align.encode_image(pixels, text_cls=text_cls)
        pairs = models["cls_cosine"].patch_align.encode_image_pairs(pixels, torch.tensor([2, 0, 2]), text_cls)
    assert torch.equal(det.scores, det.logits.sigmoid()) and not torch.equal(det.aware, det.agnostic)
    assert torch.equal(cos.aware, cos.agnostic) and torch.equal(cos.agnostic, det.agnostic)
    torch.testing.assert_close(cos.logits, det.logits, rtol=0, atol=0)  # same detector, same text: same logits
    torch.testing.assert_close(pairs, cos.agnostic[[2, 0, 2]], rtol=1e-5, atol=1e-5)  # batch-size-only float noise
    ids = torch.randint(4, 40, (3, 6), generator=g)
    ids[:, 0] = 1
    out = models["cls_cosine"](pixel_values=pixels, input_ids=ids, patch_labels=torch.ones(3, 16))
    assert out.loss_pta is not None and out.loss_pta > 0
