"""Semantic visual heads: masking without dilution, switched-off heads, overfitting a tiny batch."""

import pytest
import torch
import torch.nn.functional as F

from leanvlp.modeling.semantic_heads import IGNORE_INDEX, RegionFeatureHead, SemanticHeads


def _targets(B=4, P=16, A=5, M=3, D=8, C=6):
    g = torch.Generator().manual_seed(0)
    return dict(
        class_labels=torch.randint(0, C + 1, (B, P), generator=g),
        attribute_labels=(torch.rand(B, P, A, generator=g) > 0.5).float(),
        attribute_mask=torch.rand(B, P, generator=g) > 0.3,
        region_box_masks=torch.rand(B, M, P, generator=g) > 0.5,
        region_features=torch.randn(B, M, D, generator=g),
        region_mask=torch.ones(B, M, dtype=torch.bool),
    )


def _heads(**on):
    kw = dict(object_class=False, attribute=False, region_feature=False)
    kw.update(on)
    return SemanticHeads(32, num_classes=6, num_attributes=5, teacher_size=8, **kw)


def test_switched_off_heads_have_no_parameters_and_no_terms():
    assert sum(p.numel() for p in _heads().parameters()) == 0
    assert _heads()(torch.randn(4, 16, 32), **_targets()) == {}
    only = _heads(attribute=True)
    assert set(only(torch.randn(4, 16, 32), **_targets())) == {"attribute"}
    assert {n.split(".")[0] for n, _ in only.named_parameters()} == {"attribute"}


def test_unannotated_samples_contribute_zero_and_do_not_dilute():
    heads = _heads(object_class=True, attribute=True, region_feature=True)
    x, t = torch.randn(4, 16, 32), _targets()
    ref = {k: v for k, v in heads(x[:2], **{k: v[:2] for k, v in t.items()}).items()}
    # samples 2, 3 carry no annotation: ignore-index classes, empty attribute masks, invalid boxes
    t["class_labels"][2:] = IGNORE_INDEX
    t["attribute_mask"][2:] = False
    t["region_mask"][2:] = False
    got = heads(x, **t)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name])


def test_losses_match_their_definitions():
    heads = _heads(object_class=True, attribute=True)
    x, t = torch.randn(4, 16, 32), _targets()
    losses = heads(x, **t)
    ce = F.cross_entropy(heads.object_class(x).flatten(0, 1), t["class_labels"].flatten())
    torch.testing.assert_close(losses["object_class"], ce)
    m = t["attribute_mask"]
    bce = F.binary_cross_entropy_with_logits(heads.attribute(x)[m], t["attribute_labels"][m])
    torch.testing.assert_close(losses["attribute"], bce)


def test_region_pooling_and_cosine_loss():
    head = RegionFeatureHead(4, 3, loss_type="cosine")
    x = torch.randn(1, 4, 4)
    masks = torch.tensor([[[True, True, False, False]]])
    pooled = x[0, :2].mean(0)
    torch.testing.assert_close(head(x, masks)[0, 0], head.proj(head.norm(pooled)))
    with pytest.raises(ValueError, match="loss_type.*'l2'"):
        RegionFeatureHead(4, 3, loss_type="l2")


def test_batch_without_annotations_gives_zero_that_touches_parameters():
    heads = _heads(object_class=True)
    loss = heads(torch.randn(2, 16, 32), class_labels=torch.full((2, 16), IGNORE_INDEX))["object_class"]
    assert loss.item() == 0.0
    loss.backward()
    assert heads.object_class.classifier.weight.grad is not None


@pytest.mark.parametrize("head", ["object_class", "attribute", "region_feature"])
def test_each_head_overfits_a_tiny_batch(head):
    torch.manual_seed(0)
    heads = _heads(**{head: True})
    x = torch.randn(4, 16, 32)
    t = _targets()
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = heads(x, **t)[head]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (head, first, loss.item())


@pytest.mark.parametrize("dim", [1, 5, 16])
def test_region_features_of_the_wrong_size_are_refused_naming_teacher_size(dim):
    # dim 1 used to broadcast silently into the loss; 5 and 16 failed deep inside torch
    targets = _targets(D=dim)
    with pytest.raises(ValueError, match=rf"region_features has feature size {dim} .*teacher_size=8"):
        _heads(region_feature=True)(torch.randn(4, 16, 32), **targets)


def test_patch_index_takes_every_target_at_the_kept_grid_positions():
    """Heads reading K kept patches (patch_index (B, K)) score them against the targets at those positions: the
    same losses as the full-grid call on a grid whose other patches carry no target, gathered here by hand."""
    torch.manual_seed(0)
    heads = _heads(object_class=True, attribute=True, region_feature=True)
    t = _targets()
    B, P, K = 4, 16, 6
    patch_index = torch.stack([torch.randperm(P)[:K].sort().values for _ in range(B)])  # (B, K)
    x = torch.randn(B, K, 32)
    got = heads(x, **t, patch_index=patch_index)
    by_hand = dict(
        class_labels=torch.stack([t["class_labels"][b, patch_index[b]] for b in range(B)]),
        attribute_labels=torch.stack([t["attribute_labels"][b, patch_index[b]] for b in range(B)]),
        attribute_mask=torch.stack([t["attribute_mask"][b, patch_index[b]] for b in range(B)]),
        region_box_masks=torch.stack([t["region_box_masks"][b][:, patch_index[b]] for b in range(B)]),
        region_features=t["region_features"], region_mask=t["region_mask"],
    )
    ref = heads(x, **by_hand)
    assert set(got) == set(ref) == {"object_class", "attribute", "region_feature"}
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0)
    full = torch.arange(P).expand(B, P)  # every patch, in grid order: the plain call
    x_full = torch.randn(B, P, 32)
    for name, value in heads(x_full, **t, patch_index=full).items():
        torch.testing.assert_close(value, heads(x_full, **t)[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"patch_index has shape \(4, 5\).*\(4, 6\)"):
        heads(x, **t, patch_index=patch_index[:, :5])
