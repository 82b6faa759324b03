"""The merging block loop speaks transformers: attention backends, attention outputs, checkpointing, compile.

Tolerance 1e-5: the tiny towers are 3 layers of width 32 in float32, where two correct summation orders
(eager matmuls vs a fused SDPA kernel) differ by ~1e-7 per layer (eps * sqrt(width) * |activations|).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
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
    TokenMergingConfig,
    TokenMergingEncoder,
    check_attention_backend,
    padding_bias,
)
from leanvlp.modeling.vision_tower import TokenMergingVisionTower

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
TOL = 1e-5
FAMILIES = ["clip", "siglip", "vit", "dinov2"]
CPU_BACKENDS = ["eager", "sdpa"]  # flex_attention: its own (slow, compiling) tests below
MERGINGS = {
    "size_weighted+prop_attn": dict(r=3, mode="size_weighted", prop_attn=True),
    "mean": dict(r=3, mode="mean", prop_attn=False),
}


def _tiny(family: str, backend: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(attn_implementation=backend, **TINY)
    if family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(intermediate_size=64, **kw))
    elif family == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(intermediate_size=64, **kw))
    elif family == "vit":
        model = ViTModel(ViTConfig(intermediate_size=64, **kw), add_pooling_layer=False)
    else:
        model = Dinov2Model(Dinov2Config(mlp_ratio=2, **kw))
    return model.eval()


def _merging(family: str, **kw) -> TokenMergingConfig:
    return TokenMergingConfig(protected=0 if family == "siglip" else 1, **kw)


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _bert(backend: str) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                vocab_size=50, attn_implementation=backend)).eval()


# ----------------------------------------------------------------------------- r = 0 per backend and family


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_r0_equals_the_transformers_model_under_each_backend(family, backend):
    model = _tiny(family, backend)
    tower = TokenMergingVisionTower(model)
    assert tower.backend == backend
    with torch.no_grad():
        expected = model(pixel_values=_pixels()).last_hidden_state
        got = tower(_pixels()).last_hidden_state
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bert_bridge_layers_at_r0_equal_bert_under_each_backend(backend):
    bert = _bert(backend)
    encoder = TokenMergingEncoder(bert.encoder.layer, BertLayerAdapter(), TokenMergingConfig(r=0))
    assert encoder.backend == backend
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = encoder(bert.embeddings(input_ids=ids), attn_bias=padding_bias(mask, torch.float32)).last_hidden_state
    assert (got - expected).abs().max().item() <= TOL


def test_set_attn_implementation_on_the_model_reaches_the_tower():
    model = _tiny("vit")
    tower = TokenMergingVisionTower(model, TokenMergingConfig(r=3))
    model.set_attn_implementation("eager")
    assert tower.backend == "eager"
    assert len(tower(_pixels(), output_attentions=True).attentions) == 3  # only eager returns maps


# ----------------------------------------------------------------------------- merging on: eager == sdpa


@pytest.mark.parametrize("merging", list(MERGINGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_equals_sdpa_with_merging_on(family, merging):
    outs = {}
    for backend in CPU_BACKENDS:
        tower = TokenMergingVisionTower(_tiny(family, backend), _merging(family, **MERGINGS[merging]))
        with torch.no_grad():
            outs[backend] = tower(_pixels(), track_sources=True)
    eager, sdpa = outs["eager"], outs["sdpa"]
    assert eager.token_counts == sdpa.token_counts and eager.token_counts[-1] < 17 - (family == "siglip")
    assert torch.equal(eager.sources, sdpa.sources)  # the same groups were merged
    assert (eager.last_hidden_state - sdpa.last_hidden_state).abs().max().item() <= TOL


@pytest.mark.parametrize("merging", list(MERGINGS))
def test_bert_bridge_eager_equals_sdpa_with_merging_on(merging):
    hidden = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    outs = [TokenMergingEncoder(_bert(b).encoder.layer, BertLayerAdapter(), TokenMergingConfig(**MERGINGS[merging]))
            (hidden).last_hidden_state for b in CPU_BACKENDS]
    assert outs[0].shape == (2, 17 - 9, 32)
    assert (outs[0] - outs[1]).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- attention and hidden-state outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_attention_maps_follow_each_layers_token_count(family):
    merging = _merging(family, r=3)
    tower = TokenMergingVisionTower(_tiny(family, "eager"), merging)
    out = tower(_pixels(), output_attentions=True, output_hidden_states=True)
    n_in = tower.num_tokens()
    before_each = [n_in, *out.token_counts[:-1]]  # a layer attends over the tokens it received
    assert [a.shape for a in out.attentions] == [(2, 4, n, n) for n in before_each]
    for attention in out.attentions:
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]), rtol=0, atol=1e-5)
    assert [h.shape[1] for h in out.hidden_states] == [n_in, *out.token_counts]
    m = tower.vision_model
    final_norm = {"clip": lambda h: h, "siglip": lambda h: m.post_layernorm(h)}.get(family, lambda h: m.layernorm(h))
    assert torch.equal(final_norm(out.hidden_states[-1]), out.last_hidden_state)  # states are before the norm


def test_sdpa_with_output_attentions_returns_no_maps():
    tower = TokenMergingVisionTower(_tiny("vit", "sdpa"), TokenMergingConfig(r=3))
    assert tower(_pixels(), output_attentions=True).attentions == ()


def test_bridge_attention_maps_through_merged_layers():
    encoder = TokenMergingEncoder(_bert("eager").encoder.layer, BertLayerAdapter(), TokenMergingConfig(r=4))
    out = encoder(torch.randn(1, 17, 32), output_attentions=True)
    assert [a.shape[-1] for a in out.attentions] == [17, 13, 9]


# ----------------------------------------------------------------------------- flash: refused at config time


def test_flash_attention_is_refused_at_configuration_when_a_bias_is_needed():
    with pytest.raises(ValueError, match=r"flash_attention_2.*mode='size_weighted', prop_attn=True"):
        check_attention_backend("flash_attention_2", TokenMergingConfig(r=4))
    with pytest.raises(ValueError, match=r"flash_attention_3.*padding"):
        check_attention_backend("flash_attention_3", TokenMergingConfig(r=4, mode="mean"), padded=True)
    check_attention_backend("flash_attention_2", TokenMergingConfig(r=4, mode="mean"))  # no bias: allowed
    check_attention_backend("flash_attention_2", TokenMergingConfig(r=4, prop_attn=False))
    model = _tiny("vit")
    model.config._attn_implementation = "flash_attention_2"  # what set_attn_implementation does on a GPU
    with pytest.raises(ValueError, match="TokenMergingVisionTower: attn_implementation='flash_attention_2'"):
        TokenMergingVisionTower(model, TokenMergingConfig(r=4))


# ----------------------------------------------------------------------------- gradient checkpointing


def _count_checkpointed(layers) -> list[int]:
    """Wrap each layer's checkpointing function with a counter (transformers installs the function)."""
    calls = [0]
    for layer in layers:
        inner = layer._gradient_checkpointing_func

        def counted(*args, _inner=inner, **kwargs):
            calls[0] += 1
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counted
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_the_tower_gives_the_same_loss_and_gradients(family):
    base = _tiny(family, "sdpa").train()
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        tower = TokenMergingVisionTower(model, _merging(family, r=3))
        calls = [0]
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            calls = _count_checkpointed(tower.layers)
        loss = tower(_pixels()).last_hidden_state.square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        assert calls[0] == (3 if checkpointing else 0)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_the_bridge_gives_the_same_gradients():
    bert = _bert("sdpa").train()
    hidden = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(bert)
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        encoder = TokenMergingEncoder(model.encoder.layer, BertLayerAdapter(), TokenMergingConfig(r=4))
        calls = _count_checkpointed(encoder.layers) if checkpointing else [0]
        torch.manual_seed(5)  # the same dropout masks: the checkpointed recompute restores the RNG state
        encoder(hidden).last_hidden_state.square().mean().backward()
        grads.append([p.grad for p in model.encoder.parameters()])
        assert calls[0] == (3 if checkpointing else 0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_compiles_with_fullgraph_and_equals_eager_mode(family):
    torch._dynamo.reset()
    tower = TokenMergingVisionTower(_tiny(family), _merging(family, r=3))
    compiled = torch.compile(tower, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    with torch.no_grad():
        expected, got = tower(_pixels()), compiled(_pixels())
    assert got.token_counts == expected.token_counts
    assert (got.last_hidden_state - expected.last_hidden_state).abs().max().item() <= TOL


def test_bridge_compiles_with_fullgraph_and_equals_eager_mode():
    torch._dynamo.reset()
    encoder = TokenMergingEncoder(_bert("sdpa").encoder.layer, BertLayerAdapter(), TokenMergingConfig(r=4))
    compiled = torch.compile(encoder, fullgraph=True, backend="aot_eager")
    hidden = torch.randn(2, 17, 32)
    with torch.no_grad():
        assert (compiled(hidden).last_hidden_state - encoder(hidden).last_hidden_state).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- flex attention (compiles on CPU)


@pytest.mark.slow
def test_flex_attention_at_r0_equals_the_transformers_model_under_flex():
    model = _tiny("vit", "flex_attention")
    tower = TokenMergingVisionTower(model)
    assert tower.backend == "flex_attention"
    with torch.no_grad():
        expected = model(pixel_values=_pixels()).last_hidden_state
        assert (tower(_pixels()).last_hidden_state - expected).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("merging", list(MERGINGS))
def test_flex_attention_equals_sdpa_with_merging_on(merging):
    outs = {}
    for backend in ("sdpa", "flex_attention"):
        tower = TokenMergingVisionTower(_tiny("vit", backend), TokenMergingConfig(**MERGINGS[merging]))
        with torch.no_grad():
            outs[backend] = tower(_pixels()).last_hidden_state
    assert (outs["sdpa"] - outs["flex_attention"]).abs().max().item() <= TOL
