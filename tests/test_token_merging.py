"""Token merging: equality with transformers at r=0, ToMe's invariants, schedules, hooks, errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from leanvlp.modeling.token_merging import (
    BertLayerAdapter,
    BlockHook,
    MergeState,
    TokenMergingConfig,
    TokenMergingEncoder,
    bipartite_soft_matching,
    merge_tokens,
    padding_bias,
    run_token_merging,
)
from leanvlp.modeling.vision_tower import TokenMergingVisionTower, ViTLayerAdapter

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
R16_COUNTS = [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
R16_DECREASING_COUNTS = [165, 136, 110, 87, 67, 50, 36, 25, 17, 12, 10, 10]


def _tiny(family: str) -> torch.nn.Module:
    if family == "clip":
        return CLIPVisionModel(CLIPVisionConfig(intermediate_size=64, **TINY))
    if family == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(intermediate_size=64, **TINY))
    if family == "vit":
        return ViTModel(ViTConfig(intermediate_size=64, **TINY), add_pooling_layer=False)
    if family == "dinov2":
        return Dinov2Model(Dinov2Config(mlp_ratio=2, **TINY))
    raise KeyError(family)


def _narrow_vit_224(layers: int = 12) -> ViTModel:
    config = ViTConfig(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=16,
                       image_size=224, patch_size=16)
    return ViTModel(config, add_pooling_layer=False).eval()


class _Recorder(BlockHook):
    """Keeps the state after each block."""

    def __init__(self) -> None:
        self.after_attention_calls: list[int] = []
        self.states: list[tuple[int, torch.Tensor, MergeState]] = []

    def after_attention(self, layer_idx, hidden, state):
        self.after_attention_calls.append(layer_idx)
        return hidden, state

    def after_block(self, layer_idx, hidden, state):
        self.states.append((layer_idx, hidden, state))
        return hidden, state


# ----------------------------------------------------------------------------- equality at r = 0


@pytest.mark.parametrize("family", ["clip", "siglip", "vit", "dinov2"])
def test_r0_equals_the_transformers_model(family):
    model = _tiny(family).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
        out = TokenMergingVisionTower(model)(pixels)
    assert out.last_hidden_state.shape == expected.shape
    assert (out.last_hidden_state - expected).abs().max().item() <= 1e-5
    assert out.token_counts == [expected.shape[1]] * 3
    assert torch.equal(out.sizes, torch.ones(2, expected.shape[1], 1))


def test_tower_holds_the_model_itself_and_accepts_a_clip_model():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(intermediate_size=64, **TINY)))
    tower = TokenMergingVisionTower(clip, TokenMergingConfig(r=2))
    assert tower.vision_model is clip.vision_model
    assert {id(p) for p in tower.parameters()} == {id(p) for p in clip.vision_model.parameters()}
    assert tower.num_tokens() == 17 and tower.token_counts() == [15, 13, 11] and tower.output_tokens() == 11
    assert tower(torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 11, 32)


def test_bert_layers_at_r0_equal_the_bert_encoder_with_and_without_padding():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=50, attn_implementation="sdpa")).eval()
    encoder = TokenMergingEncoder(bert.encoder.layer, BertLayerAdapter(), TokenMergingConfig(r=0))
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        hidden = torch.randn(2, 9, 32)
        expected = bert.encoder(hidden).last_hidden_state
        assert (encoder(hidden).last_hidden_state - expected).abs().max().item() <= 1e-5
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        out = encoder(bert.embeddings(input_ids=ids), attn_bias=padding_bias(mask, torch.float32))
    assert (out.last_hidden_state - expected).abs().max().item() <= 1e-5


def test_bert_encoder_merges_and_drops_the_padding_bias_once_tokens_merge():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                vocab_size=50)).eval()
    encoder = TokenMergingEncoder(bert.encoder.layer, BertLayerAdapter(), {"r": 3, "mode": "mean"})
    bias = padding_bias(torch.ones(2, 13), torch.float32)
    out = encoder(torch.randn(2, 13, 32), attn_bias=bias, track_sources=True)
    assert out.token_counts == encoder.token_counts(13) == [10, 7, 4]  # a kept (B,1,1,13) bias would fail in SDPA
    assert torch.equal(out.sources.sum(-1, keepdim=True), out.sizes)


# ----------------------------------------------------------------------------- ToMe invariants


def test_sizes_sources_and_cls_after_every_layer():
    model = _tiny("vit").eval()
    tower = TokenMergingVisionTower(model, TokenMergingConfig(r=3))
    recorder = _Recorder()
    out = tower(torch.randn(2, 3, 32, 32), hooks=[recorder], track_sources=True)
    assert recorder.after_attention_calls == [0, 1, 2]
    assert [i for i, _, _ in recorder.states] == [0, 1, 2]
    for _, hidden, state in recorder.states:
        n = hidden.shape[1]
        assert state.sizes.shape == (2, n, 1) and state.sources.shape == (2, n, 17)
        assert torch.equal(state.sizes.sum(dim=1), torch.full((2, 1), 17.0))
        assert torch.equal(state.sources.sum(dim=1), torch.ones(2, 17))  # each patch in exactly one token
        assert torch.equal(state.sources.sum(dim=-1, keepdim=True), state.sizes)
        assert torch.equal(state.sources[:, 0], F.one_hot(torch.tensor([0, 0]), 17).float())  # CLS alone, first
    assert out.token_counts == [14, 11, 8]


def test_all_ones_sizes_make_proportional_attention_a_no_op():
    model = _tiny("vit").eval()
    layer, hidden = model.layers[0], torch.randn(2, 17, 32)
    bias = MergeState(sizes=torch.ones(2, 17, 1)).attention_bias(prop_attn=True)
    assert bias.shape == (2, 1, 1, 17) and torch.equal(bias, torch.zeros(2, 1, 1, 17))
    with torch.no_grad():
        plain, keys_plain, _ = ViTLayerAdapter().attention(layer, hidden, None)
        prop, keys_prop, _ = ViTLayerAdapter().attention(layer, hidden, bias)
    assert (plain - prop).abs().max().item() <= 1e-6
    assert torch.equal(keys_plain, keys_prop)


def test_proportional_attention_makes_merging_identical_tokens_invisible_to_other_queries():
    # the raw attention math: key/value j duplicates key/value i; merging them with size 2 changes nothing
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
    k[..., 4, :], v[..., 4, :] = k[..., 1, :], v[..., 1, :]
    full = F.scaled_dot_product_attention(q, k, v)
    keep = [0, 1, 2, 3, 5]
    sizes = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0]).view(1, 5, 1)
    merged = F.scaled_dot_product_attention(q, k[..., keep, :], v[..., keep, :],
                                            attn_mask=MergeState(sizes=sizes).attention_bias(True))
    assert torch.allclose(full, merged, atol=1e-6)
    without = F.scaled_dot_product_attention(q, k[..., keep, :], v[..., keep, :])
    assert not torch.allclose(full, without, atol=1e-3)
    # the same through a real ViT layer: tokens 1 and 4 identical, then merged with size 2
    layer = _tiny("vit").eval().layers[0]
    hidden = torch.randn(1, 6, 32)
    hidden[:, 4] = hidden[:, 1]
    with torch.no_grad():
        ref, _, _ = ViTLayerAdapter().attention(layer, hidden, None)
        out, _, _ = ViTLayerAdapter().attention(layer, hidden[:, keep], MergeState(sizes=sizes).attention_bias(True))
    assert (ref[:, keep] - out).abs().max().item() <= 1e-5


def test_exact_token_counts_for_197_tokens_forward_and_config_agree():
    model = _narrow_vit_224()
    pixels = torch.randn(1, 3, 224, 224)
    for r, expected in [(16, R16_COUNTS), ((16, -1), R16_DECREASING_COUNTS)]:
        tower = TokenMergingVisionTower(model, TokenMergingConfig(r=r))
        assert tower.num_tokens() == 197
        with torch.no_grad():
            out = tower(pixels)
        assert out.token_counts == expected
        assert TokenMergingConfig(r=r).token_counts(197, 12) == expected
        assert out.last_hidden_state.shape == (1, expected[-1], 16)
    assert TokenMergingConfig(r=(16, -1)).schedule(12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]


def test_schedules_asking_for_too_much_are_clipped_alike_in_forward_and_config():
    model = _tiny("vit").eval()
    pixels = torch.randn(1, 3, 32, 32)
    for merging in [TokenMergingConfig(r=100), TokenMergingConfig(r=[9, 0, 5]), TokenMergingConfig(r=(7, -1)),
                    TokenMergingConfig(r=100, protected=0), TokenMergingConfig(r=100, protected=3)]:
        with torch.no_grad():
            out = TokenMergingVisionTower(model, merging)(pixels, track_sources=True)
        assert out.token_counts == merging.token_counts(17, 3)
        assert torch.equal(out.sources.sum(dim=1), torch.ones(1, 17))
    assert TokenMergingConfig(r=100).token_counts(17, 3) == [9, 5, 3]
    assert TokenMergingConfig(r=100, protected=3).token_counts(17, 3) == [10, 7, 5]


def test_gradients_reach_every_tower_parameter_with_merging_on():
    model = _tiny("dinov2").train()
    tower = TokenMergingVisionTower(model, TokenMergingConfig(r=4))
    out = tower(torch.randn(2, 3, 32, 32))
    assert out.token_counts == [13, 9, 5]
    out.last_hidden_state.pow(2).mean().backward()
    for name, param in model.named_parameters():
        if name.endswith("mask_token"):
            continue  # only used with bool_masked_pos
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- matching and merging by hand


def _hand_case():
    # token 0 protected; A = positions 2, 4; B = positions 1, 3. Token 2 is most similar to token 3.
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0.1, 1], [0, 0, 1], [0.7, 0.7, 0]]])
    x = torch.arange(15, dtype=torch.float32).view(1, 5, 3)
    return metric, x


def test_bipartite_matching_by_hand_order_and_size_weighting():
    metric, x = _hand_case()
    sizes = torch.tensor([1.0, 1, 1, 3, 1]).view(1, 5, 1)
    out, state = merge_tokens(x, metric, 1, MergeState(sizes=sizes), "size_weighted", protected=1)
    # order [protected, unmerged A, B] = [0, 4, 1, 2+3]
    expected_merged = (x[0, 2] * 1 + x[0, 3] * 3) / 4
    assert torch.allclose(out[0], torch.stack([x[0, 0], x[0, 4], x[0, 1], expected_merged]))
    assert state.sizes.flatten().tolist() == [1, 1, 1, 4]
    out_mean, state_mean = merge_tokens(x, metric, 1, MergeState(sizes=sizes), "mean", protected=1)
    assert torch.allclose(out_mean[0, 3], (x[0, 2] + x[0, 3]) / 2)
    assert state_mean.sizes.flatten().tolist() == [1, 1, 1, 4]


def test_unmerged_order_without_protected_tokens_follows_the_official_tome_code():
    """Six tokens, nothing protected: A = positions 0, 2, 4 and B = 1, 3, 5. One-hot keys make A0's best
    cosine 0.6 (to B1), A2's 1.0 (to B3) and A4's 0.8 (to B5), so r=1 merges A2 into B3. The official code
    keeps the unmerged A tokens in descending score order (A4, A0) when no CLS is protected; "spatial"
    re-sorts them (A0, A4). That order is the next block's A/B split, so the groups diverge from then on."""
    e = torch.eye(4)  # e[3] is a direction no B token has
    metric = torch.stack([
        0.6 * e[0] + 0.8 * e[3],  # A0: cosine 0.6 with B1, 0 with B3 and B5
        e[0],                     # B1
        e[1],                     # A2: cosine 1.0 with B3
        e[1],                     # B3
        0.8 * e[2] + 0.6 * e[3],  # A4: cosine 0.8 with B5, 0 with B1 and B3
        e[2],                     # B5
    ])[None]  # (1, 6, 4)
    x = torch.arange(6.0).view(1, 6, 1)
    tome, _ = merge_tokens(x, metric, 1, MergeState(), "mean", protected=0)
    spatial, _ = merge_tokens(x, metric, 1, MergeState(), "mean", protected=0, unmerged_order="spatial")
    assert tome.flatten().tolist() == [4.0, 0.0, 1.0, 2.5, 5.0]     # [A4, A0, B1, (A2+B3)/2, B5]
    assert spatial.flatten().tolist() == [0.0, 4.0, 1.0, 2.5, 5.0]  # [A0, A4, B1, (A2+B3)/2, B5]
    assert TokenMergingConfig().unmerged_order == "tome"
    # with a protected token both orders are the position order (ToMe re-sorts after its CLS fix-up)
    a, _ = merge_tokens(x, metric, 1, MergeState(), "mean", protected=1)
    b, _ = merge_tokens(x, metric, 1, MergeState(), "mean", protected=1, unmerged_order="spatial")
    assert torch.equal(a, b)


def test_unmerge_inverts_merge_in_the_tome_order_too():
    metric, x = torch.randn(2, 10, 4), torch.randn(2, 10, 5)
    merge, unmerge = bipartite_soft_matching(metric, 3, protected=0, unmerged_order="tome")
    back = unmerge(merge(x, "mean"))
    for i in range(2):
        assert len({tuple(t.tolist()) for t in back[i]}) == 10 - 3


def test_protected_tokens_stay_in_front_in_order():
    metric, x = torch.randn(2, 10, 4), torch.randn(2, 10, 6)
    metric[:, 1] = metric[:, 2]  # a distillation token identical to a patch must still not merge
    out, _ = merge_tokens(x, metric, 4, MergeState(), protected=2)
    assert out.shape == (2, 6, 6)
    assert torch.equal(out[:, :2], x[:, :2])


def test_unmerge_restores_the_layout():
    metric, x = torch.randn(2, 9, 4), torch.randn(2, 9, 5)
    merge, unmerge = bipartite_soft_matching(metric, 3, protected=1)
    merged = merge(x, "mean")
    back = unmerge(merged)
    assert back.shape == x.shape and torch.equal(back[:, 0], x[:, 0])
    tokens = {tuple(t.tolist()) for t in back[0]}
    assert len(tokens) == 9 - 3  # 3 pairs now share their merged value
    assert all(tuple(t.tolist()) in tokens for t in merged[0])


def test_mean_mode_never_uses_proportional_attention():
    model = _tiny("vit").eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = TokenMergingVisionTower(model, TokenMergingConfig(r=3, mode="mean", prop_attn=True))(pixels)
        b = TokenMergingVisionTower(model, TokenMergingConfig(r=3, mode="mean", prop_attn=False))(pixels)
        c = TokenMergingVisionTower(model, TokenMergingConfig(r=3, prop_attn=True))(pixels)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert not torch.allclose(a.last_hidden_state, c.last_hidden_state)


# ----------------------------------------------------------------------------- hooks


class _DropLast(BlockHook):
    """Prunes the last token after block 0, folding its sources into the token before it."""

    def after_block(self, layer_idx, hidden, state):
        if layer_idx != 0:
            return hidden, state
        sizes = torch.cat([state.sizes[:, :-2], state.sizes[:, -2:].sum(1, keepdim=True)], dim=1)
        sources = torch.cat([state.sources[:, :-2], state.sources[:, -2:].sum(1, keepdim=True)], dim=1)
        return hidden[:, :-1], MergeState(sizes=sizes, sources=sources)


def test_hooks_may_change_the_token_count_after_a_block():
    model = _tiny("vit").eval()
    out = TokenMergingVisionTower(model, TokenMergingConfig(r=2))(torch.randn(1, 3, 32, 32), hooks=[_DropLast()],
                                                                  track_sources=True)
    assert out.token_counts == [14, 12, 10]
    assert torch.equal(out.sources.sum(-1, keepdim=True), out.sizes)


def test_a_hook_that_changes_the_count_after_attention_gets_a_clear_error():
    class Bad(BlockHook):
        def after_attention(self, layer_idx, hidden, state):
            return hidden[:, :-1], state

    with pytest.raises(ValueError, match="after_block"):
        TokenMergingVisionTower(_tiny("vit"), TokenMergingConfig(r=2))(torch.randn(1, 3, 32, 32), hooks=[Bad()])


def test_run_token_merging_without_merging_leaves_the_layers_untouched():
    model = _tiny("vit").eval()
    hidden = torch.randn(1, 17, 32)
    with torch.no_grad():
        out = run_token_merging(model.layers, ViTLayerAdapter(), TokenMergingConfig(), hidden,
                                output_hidden_states=True)
        expected = hidden
        for layer in model.layers:
            expected = layer(expected)
    assert len(out.hidden_states) == 4
    assert (out.last_hidden_state - expected).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- config and errors


@pytest.mark.parametrize("r", [16, (16, -1), [3, 0, 5]])
def test_config_round_trips_through_json_and_a_model_config(r, tmp_path):
    merging = TokenMergingConfig(r=r, mode="mean", prop_attn=False, protected=0, unmerged_order="spatial")
    again = TokenMergingConfig.from_dict(json.loads(json.dumps(merging.to_dict())))
    assert again == merging and type(again.r) is type(merging.r)
    ViTConfig(token_merging=merging.to_dict()).save_pretrained(tmp_path)
    loaded = ViTConfig.from_pretrained(tmp_path)
    assert TokenMergingConfig.from_dict(loaded.token_merging) == merging


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=-1), "-1"),
        (dict(r=2.5), "2.5"),
        (dict(r=True), "True"),
        (dict(r=[3, -2, 1]), "-2"),
        (dict(r=(16, 2)), r"\(16, 2\)"),
        (dict(r=(16.5, -1)), "16.5"),
        (dict(mode="max"), "'max'"),
        (dict(protected=-1), "protected.*-1"),
        (dict(protected=1.5), "protected.*1.5"),
        (dict(prop_attn="yes"), "'yes'"),
        (dict(unmerged_order="sorted"), "unmerged_order.*'sorted'"),
    ],
)
def test_bad_config_values_are_named_in_the_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenMergingConfig(**kwargs)


def test_other_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="2 entries but the model has 3 layers"):
        TokenMergingVisionTower(_tiny("vit"), TokenMergingConfig(r=[1, 2]))
    with pytest.raises(ValueError, match="unknown keys"):
        TokenMergingConfig.from_dict({"r": 1, "ratio": 0.5})
    with pytest.raises(TypeError, match="CLIPVisionModel.*SiglipVisionModel.*ViTModel.*Dinov2Model.*got BertModel"):
        TokenMergingVisionTower(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                     intermediate_size=64, vocab_size=50)))
    with pytest.raises(ValueError, match="protected=20"):
        TokenMergingVisionTower(_tiny("vit"), TokenMergingConfig(r=1, protected=20))(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="pixel_values"):
        TokenMergingVisionTower(_tiny("vit"))(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="mode"):
        merge_tokens(torch.randn(1, 5, 2), torch.randn(1, 5, 2), 1, MergeState(), mode="median")
    with pytest.raises(TypeError, match="merging"):
        TokenMergingVisionTower(_tiny("vit"), merging=16)


def test_raw_uint8_pixels_are_refused_naming_the_dtype():
    tower = TokenMergingVisionTower(_tiny("vit"))
    raw = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"dtype torch.uint8 \(value range \d+\.\.\d+\); run the model's processor"):
        tower(raw)
