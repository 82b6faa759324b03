"""Text-guided merging: relevance scores keep the most text-relevant tokens out of ToMe's matching."""

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTModel

from leanvlp.modeling.token_merging import (
    BlockHook,
    MergeState,
    TokenMergingConfig,
    merge_tokens,
    relevant_guard,
    text_relevance,
)
from leanvlp.modeling.vision_tower import TokenMergingVisionTower

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)  # 16 patches (+ CLS for ViT)


def _vit() -> ViTModel:
    torch.manual_seed(0)
    return ViTModel(ViTConfig(**TINY), add_pooling_layer=False).eval()


def _towers(model, **merging):
    plain = TokenMergingVisionTower(model, TokenMergingConfig(r=2, **merging))
    guided = TokenMergingVisionTower(model, TokenMergingConfig(r=2, protect_relevant=4, **merging))
    return plain, guided


def _singletons(sources: torch.Tensor) -> set[int]:
    """Original tokens that are still alone in their group: (N', N0) 0/1 -> indices."""
    alone = sources[sources.sum(dim=-1) == 1]
    return set(alone.argmax(dim=-1).tolist())


def test_guidance_off_or_without_relevance_is_bit_identical_to_plain_merging():
    model, pixels = _vit(), torch.randn(2, 3, 32, 32)
    relevance = torch.rand(2, 17)
    plain, guided = _towers(model)
    reference = plain(pixels, track_sources=True)
    off = plain(pixels, track_sources=True, relevance=relevance)  # protect_relevant=0: relevance ignored
    fallback = guided(pixels, track_sources=True)  # no text (captioning): plain ToMe
    for out in (off, fallback):
        assert torch.equal(out.last_hidden_state, reference.last_hidden_state)
        assert torch.equal(out.sources, reference.sources)


def test_equal_relevance_everywhere_equals_plain_merging():
    model, pixels = _vit(), torch.randn(2, 3, 32, 32)
    plain, guided = _towers(model)
    reference = plain(pixels, track_sources=True)
    out = guided(pixels, track_sources=True, relevance=torch.full((2, 17), 0.3))
    assert torch.equal(out.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(out.sources, reference.sources)


@pytest.mark.parametrize("protected, unmerged_order", [(1, "tome"), (0, "tome"), (0, "spatial")])
def test_relevant_tokens_are_never_merged_and_counts_follow_the_config(protected, unmerged_order):
    torch.manual_seed(1)
    model = _vit() if protected else SiglipVisionModel(SiglipVisionConfig(**TINY)).eval()
    n = 16 + protected
    merging = dict(protected=protected, unmerged_order=unmerged_order)
    plain, guided = _towers(model, **merging)
    pixels = torch.randn(3, 3, 32, 32)
    relevance = torch.rand(3, n)
    relevant = [set((relevance[b, protected:].topk(4).indices + protected).tolist()) for b in range(3)]
    out = guided(pixels, track_sources=True, relevance=relevance)
    assert out.token_counts == TokenMergingConfig(r=2, **merging).token_counts(n, 3) == [n - 2, n - 4, n - 6]
    for b in range(3):
        assert relevant[b] <= _singletons(out.sources[b]), f"image {b}: a relevant token was merged"
    # the same images merged plainly lose some of those tokens: guidance changed something
    lost = [relevant[b] - _singletons(plain(pixels, track_sources=True).sources[b]) for b in range(3)]
    assert any(lost)


def test_more_guards_than_the_schedule_leaves_fail_before_running_naming_the_bound():
    # 17 tokens, CLS protected, r=3: A/B sizes 8/8, 6/7, 5/5 -> min(Na - r, Nb - 1) = 5, 3, 2
    merging = TokenMergingConfig(r=3, protect_relevant=3)
    assert merging.max_protect_relevant(17, 3) == 2
    assert TokenMergingConfig(r=2, protected=0).max_protect_relevant(16, 3) == 4
    tower = TokenMergingVisionTower(_vit(), merging)
    with pytest.raises(ValueError, match="protect_relevant=3 .* at most 2"):
        tower(torch.randn(1, 3, 32, 32), relevance=torch.rand(1, 17))


def test_guard_rule_by_hand():
    # 1 protected + 8 tokens; A = positions 2, 4, 6, 8 and B = 1, 3, 5, 7. Above the mean of [1..8] (4.5):
    # positions with relevance 5..8. k=3 guards the three most relevant: positions 8 (A), 7 (B), 6 (A).
    relevance = torch.tensor([[9.0, 1, 2, 3, 4, 5, 6, 7, 8]])
    guard_a, guard_b = relevant_guard(relevance, protected=1, k=3, a_start=2, b_start=1)
    assert guard_a.tolist() == [[False, False, True, True]]  # positions 6, 8
    assert guard_b.tolist() == [[False, False, False, True]]  # position 7
    no_guard_a, no_guard_b = relevant_guard(torch.full((1, 9), 0.7), protected=1, k=3, a_start=2, b_start=1)
    assert not no_guard_a.any() and not no_guard_b.any()  # all equal: nothing is above the mean


def test_merged_relevance_is_the_largest_part():
    x, metric = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    metric[0, 4] = metric[0, 3]  # A4 (relevance 0.1) matches B3 (relevance 0.2) best
    state = MergeState(relevance=torch.tensor([[0.0, 0.9, 0.05, 0.2, 0.1]]))
    _, out = merge_tokens(x, metric, 1, state, "mean", protected=1)
    assert out.relevance.shape == (1, 4)
    assert out.relevance.max() == 0.9 and 0.1 not in out.relevance.tolist()


def test_text_embeds_give_the_cosine_relevance_of_the_embedded_tokens():
    model, pixels = _vit(), torch.randn(2, 3, 32, 32)
    _, guided = _towers(model)
    text = torch.randn(2, 32)
    tokens = model.embeddings(pixels)  # (B, 17, C)
    expected = guided(pixels, track_sources=True, relevance=text_relevance(tokens, text))
    out = guided(pixels, track_sources=True, text_embeds=text)
    assert torch.equal(out.sources, expected.sources)
    with pytest.raises(ValueError, match="text_embeds must be"):
        guided(pixels, text_embeds=torch.randn(2, 16))
    with pytest.raises(ValueError, match="relevance or text_embeds"):
        guided(pixels, text_embeds=text, relevance=torch.rand(2, 17))
    with pytest.raises(ValueError, match=r"relevance must be \(B, N\) = \(2, 17\)"):
        guided(pixels, relevance=torch.rand(2, 16))


def test_checkpointed_blocks_carry_relevance_and_give_the_same_result():
    model, pixels = _vit(), torch.randn(2, 3, 32, 32)
    _, guided = _towers(model)
    relevance = torch.rand(2, 17)
    reference = guided(pixels, track_sources=True, relevance=relevance)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()  # 5.18: old name
    model.train()  # dropout is 0 in the tiny config
    calls = [0]
    for layer in guided.layers:  # count the blocks that really ran checkpointed
        def counted(*args, _inner=layer._gradient_checkpointing_func, **kwargs):
            calls[0] += 1
            return _inner(*args, **kwargs)
        layer._gradient_checkpointing_func = counted
    out = guided(pixels.requires_grad_(), track_sources=True, relevance=relevance)
    out.last_hidden_state.sum().backward()
    assert calls[0] == 3
    assert torch.equal(out.sources, reference.sources)
    assert torch.allclose(out.last_hidden_state, reference.last_hidden_state, atol=1e-6)


def test_a_hook_that_drops_relevance_gets_a_clear_error():
    class Drop(BlockHook):
        def after_block(self, layer_idx, hidden, state):
            return hidden[:, :-1], MergeState(sizes=state.sizes[:, :-1])

    _, guided = _towers(_vit())
    with pytest.raises(ValueError, match="relevance"):
        guided(torch.randn(1, 3, 32, 32), hooks=[Drop()], relevance=torch.rand(1, 17))


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_protect_relevant_is_named(value):
    with pytest.raises(ValueError, match=f"protect_relevant.*{value!r}"):
        TokenMergingConfig(r=2, protect_relevant=value)


def test_config_round_trip_keeps_the_switch():
    merging = TokenMergingConfig(r=3, protect_relevant=5)
    assert TokenMergingConfig.from_dict(merging.to_dict()) == merging
