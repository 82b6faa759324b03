"""PatchAlign models, config and processor on tiny random configs (CPU, offline)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, ViTImageProcessorPil, ViTModel

from leanvlp.auto import AutoEntry, register
from leanvlp.data.shapes import COLOURS, PLURALS, SHAPES, make_shapes_dataset
from leanvlp.modeling.configuration_patch_align import PatchAlignConfig
from leanvlp.modeling.modeling_patch_align import (
    PatchAlignForConditionalGeneration,
    PatchAlignForImageTextRetrieval,
    PatchAlignForPreTraining,
    PatchAlignForQuestionAnswering,
    PatchAlignModel,
    sample_hard_negatives,
)
from leanvlp.modeling.patch_selection import PatchSelectionHook
from leanvlp.processing.processing_patch_align import PatchAlignProcessor

WORDS = "a an the and of on is are there to left right above below small large what color colour shape how many"
VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", ",", "?"] + sorted(
    set(WORDS.split()) | set(SHAPES) | set(PLURALS.values()) | set(COLOURS)
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(VOCAB))
    return BertTokenizer(str(path))


def tiny_config(**overrides) -> PatchAlignConfig:
    kw = dict(
        vision_config=dict(model_type="vit", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=8),
        text_config=dict(model_type="bert", vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
        num_fusion_layers=1, num_decoder_layers=1, embed_dim=16,
        patch_detector=dict(layer=2, keep_ratio=0.5),
        cls_token_id=1, sep_token_id=2, mask_token_id=3,
        object_classes=list(SHAPES), attributes=list(COLOURS) + ["small", "large"], teacher_size=8,
    )
    kw.update(overrides)
    return PatchAlignConfig(**kw)


ALL_HEADS = dict(object_class=dict(enabled=True, weight=0.5), attribute=dict(enabled=True, weight=2.0),
                 region_feature=dict(enabled=True, weight=3.0))


def batch(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, len(VOCAB), (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    return torch.randn(B, 3, 32, 32, generator=g), ids


def head_targets(B=3, P=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        patch_labels=(torch.rand(B, P, generator=g) > 0.5).float(), pta_mask=torch.tensor([True, False, True][:B]),
        class_labels=torch.randint(0, 7, (B, P), generator=g),
        attribute_labels=(torch.rand(B, P, 10, generator=g) > 0.5).float(), attribute_mask=torch.rand(B, P, generator=g) > 0.5,
        region_box_masks=torch.rand(B, 2, P, generator=g) > 0.5, region_features=torch.randn(B, 2, 8, generator=g),
        region_mask=torch.ones(B, 2, dtype=torch.bool),
    )


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(patch_detector=dict(layer=2, keep_ratio=0.0)), r"keep_ratio.*0\.0"),
        (dict(patch_detector=dict(layer=2, keep_ratio=1.5)), r"keep_ratio.*1\.5"),
        (dict(patch_detector=dict(layer=0)), r"layer.*\[1, 4\].*got 0"),
        (dict(patch_detector=dict(layer=5)), r"layer.*\[1, 4\].*got 5"),
        (dict(patch_detector=dict(layer=2), semantic_heads=dict(layer=3)), r"semantic_heads.layer.*got 3"),
        (dict(object_classes=[], semantic_heads=dict(object_class=dict(enabled=True))), "object_classes is empty"),
        (dict(teacher_size=0, semantic_heads=dict(region_feature=dict(enabled=True))), "teacher_size=0"),
        (dict(vision_config=dict(model_type="siglip_vision_model")), "siglip_vision_model"),
        (dict(loss_weights=dict(nsp=1.0)), "nsp"),
        (dict(mask_token_id=10_000), "mask_token_id.*10000"),
    ],
)
def test_bad_config_raises_naming_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_round_trip(tmp_path):
    cfg = tiny_config(semantic_heads=ALL_HEADS, loss_weights=dict(itm=0.25))
    cfg.save_pretrained(tmp_path)
    loaded = PatchAlignConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.loss_weights["itm"] == 0.25 and loaded.loss_weights["region_feature"] == 3.0
    assert loaded.num_kept_patches == 8 and loaded.heads_layer == 2


# ----------------------------------------------------------------------------- detector inside the tower


@pytest.mark.parametrize("keep_ratio,K", [(0.5, 8), (0.25, 4), (0.75, 12)])
def test_after_block_k_the_tower_holds_k_plus_2_tokens(keep_ratio, K):
    model = PatchAlignModel(tiny_config(patch_detector=dict(layer=2, keep_ratio=keep_ratio))).eval()
    px, ids = batch()
    hook = PatchSelectionHook(1, keep_ratio, model.detector, text=torch.randn(3, 32))
    out = model.vision_tower(px, hooks=[hook])
    assert out.token_counts == [17, K + 2, K + 2, K + 2]  # counts after each block; pruning after block 2
    enc = model.encode_image(px, text_cls=model.encode_text(ids)[:, 0])
    assert enc.agnostic.shape == enc.aware.shape == (3, K + 2, 32)
    assert enc.logits.shape == (3, 16) and enc.kept.shape == (3, K)
    assert torch.all(enc.kept[:, 1:] > enc.kept[:, :-1])  # spatial order


def test_keep_ratio_one_equals_the_unpruned_model_exactly():
    pruned = PatchAlignModel(tiny_config(patch_detector=dict(layer=2, keep_ratio=1.0))).eval()
    plain = PatchAlignModel(tiny_config(patch_detector=dict(enabled=False))).eval()
    missing, unexpected = plain.load_state_dict(pruned.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("detector.") for k in unexpected)
    px, ids = batch()
    with torch.no_grad():
        a, b = pruned(px, ids), plain(px, ids)
        reference = pruned.vision_tower.vision_model(pixel_values=px).last_hidden_state  # transformers' ViTModel
    assert isinstance(pruned.vision_tower.vision_model, ViTModel)
    for name in ("image_embeds", "image_feat", "text_feat", "fused_embeds"):
        assert torch.equal(a[name], b[name]), name
    torch.testing.assert_close(a.image_embeds, reference, rtol=1e-5, atol=1e-5)


def test_itc_image_embedding_does_not_depend_on_the_text():
    model = PatchAlignModel(tiny_config()).eval()
    px, ids = batch()
    _, other = batch(seed=1)
    with torch.no_grad():
        a, b = model(px, ids), model(px, other)
    assert torch.equal(a.image_feat, b.image_feat) and torch.equal(a.image_embeds, b.image_embeds)
    assert not torch.equal(a.fused_embeds, b.fused_embeds)


def test_fusion_is_bidirectional_and_decoder_is_causal():
    """BertLayer needs is_decoder=True for cross-attention; fusion must still see the whole text."""
    model = PatchAlignModel(tiny_config()).eval()
    px, ids = batch()
    other = ids.clone()
    other[:, 4] = (ids[:, 4] + 1 - 7) % (len(VOCAB) - 7) + 7  # change a later token
    with torch.no_grad():
        image = model.encode_image(px).agnostic
        mask = torch.ones_like(ids)
        fa, fb = (model.fuse(model.encode_text(x), mask, image) for x in (ids, other))
        memory = model.image_to_text(image)
        da, db = (model.decode(x, mask, memory) for x in (ids, other))
    assert not torch.allclose(fa[:, 0], fb[:, 0])  # the fused [CLS] sees token 4
    torch.testing.assert_close(da[:, :4], db[:, :4])  # decoder positions before 4 do not
    assert not torch.allclose(da[:, 4], db[:, 4])


# ----------------------------------------------------------------------------- pretraining losses


def test_pretraining_returns_each_loss_and_their_weighted_sum():
    cfg = tiny_config(semantic_heads=ALL_HEADS, loss_weights=dict(itc=0.5, itm=2.0, mlm=1.5, lm=0.7, pta=3.0),
                      mlm_probability=0.5)
    model = PatchAlignForPreTraining(cfg)
    px, ids = batch()
    out = model(px, ids, **head_targets())
    names = ("itc", "itm", "mlm", "lm", "pta", "object_class", "attribute", "region_feature")
    terms = {n: out[f"loss_{n}"] for n in names}
    assert all(v is not None and v.dim() == 0 and torch.isfinite(v) for v in terms.values()), terms
    expected = sum(cfg.loss_weights[n] * terms[n] for n in names)
    torch.testing.assert_close(out.loss, expected)
    assert cfg.loss_weights["attribute"] == 2.0
    out.loss.backward()
    assert model.patch_align.detector.fc1.weight.grad.abs().sum() > 0
    assert model.patch_align.logit_scale.grad is not None


def test_heads_off_add_no_parameters_and_no_terms():
    on = PatchAlignForPreTraining(tiny_config(semantic_heads=ALL_HEADS))
    off = PatchAlignForPreTraining(tiny_config())
    n_on, n_off = (sum(p.numel() for p in m.parameters()) for m in (on, off))
    assert n_on - n_off == sum(p.numel() for p in on.semantic_heads.parameters()) > 0
    assert sum(p.numel() for p in off.semantic_heads.parameters()) == 0
    px, ids = batch()
    out = off(px, ids, **head_targets())
    assert out.loss_object_class is None and out.loss_attribute is None and out.loss_region_feature is None
    # and without patch labels there is no PTA term
    assert off(px, ids).loss_pta is None


def test_pta_averages_over_annotated_samples_only():
    model = PatchAlignForPreTraining(tiny_config()).eval()
    px, ids = batch()
    t = head_targets()
    torch.manual_seed(0)
    full = model(px, ids, patch_labels=t["patch_labels"], pta_mask=t["pta_mask"])
    scores = full.patch_scores
    manual = torch.nn.functional.binary_cross_entropy(scores[t["pta_mask"]], t["patch_labels"][t["pta_mask"]])
    torch.testing.assert_close(full.loss_pta, manual, rtol=1e-4, atol=1e-5)


def test_itm_hard_negatives_are_never_the_positive_pair():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6) * 5
    sim.fill_diagonal_(100.0)  # the positive is by far the most similar: it must still never be drawn
    draws = torch.stack([sample_hard_negatives(sim, generator=g) for _ in range(500)])
    assert not (draws == torch.arange(6)).any()
    assert len(set(draws[:, 0].tolist())) > 1  # sampled, not a fixed argmax
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(torch.zeros(1, 1))
    model = PatchAlignForPreTraining(tiny_config())
    px, ids = batch(B=4)
    ids[3] = ids[1]  # two images share a caption: pairing them is not a negative either
    for seed in range(10):
        torch.manual_seed(seed)
        out = model(px, ids)
        for i, (t, v) in enumerate(zip(out.itm_negative_texts.tolist(), out.itm_negative_images.tolist())):
            assert not torch.equal(ids[t], ids[i]) and not torch.equal(ids[v], ids[i]), (i, t, v)
        assert out.itm_logits.shape == (12, 2)


def test_accepts_loss_kwargs_false():
    for cls in (PatchAlignForPreTraining, PatchAlignForConditionalGeneration, PatchAlignModel):
        assert cls.accepts_loss_kwargs is False


# ----------------------------------------------------------------------------- generation and retrieval


def test_generate_greedy_matches_a_manual_decoding_loop_and_beam_works():
    model = PatchAlignForConditionalGeneration(tiny_config()).eval()
    px, _ = batch(B=2)
    out = model.generate(pixel_values=px, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and (out[:, 0] == 1).all()
    with torch.no_grad():
        ids = torch.ones(2, 1, dtype=torch.long)
        memory, _ = model.encode_memory(px)
        for _ in range(out.shape[1] - 1):
            nxt = model(input_ids=ids, encoder_hidden_states=memory).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    for row, ref in zip(out, ids):  # identical up to the first [SEP] (then padding)
        stop = (ref == 2).nonzero()
        end = int(stop[0]) + 1 if len(stop) else len(ref)
        assert torch.equal(row[:end], ref[:end])
    beams = model.generate(pixel_values=px, max_new_tokens=4, num_beams=3)
    assert beams.shape[0] == 2 and beams.shape[1] <= 5
    # the decoder's KV cache changes no token (the conventions tests check it more closely)
    assert torch.equal(model.generate(pixel_values=px, max_new_tokens=6, do_sample=False, use_cache=True), out)
    assert torch.equal(model.generate(pixel_values=px, max_new_tokens=4, num_beams=3, use_cache=True), beams)


def test_question_answering_needs_the_question_and_generates():
    model = PatchAlignForQuestionAnswering(tiny_config()).eval()
    px, ids = batch(B=2)
    with pytest.raises(ValueError, match="question_input_ids"):
        model.generate(pixel_values=px)
    answer = model.generate(pixel_values=px, question_input_ids=ids, max_new_tokens=3)
    assert answer.shape[0] == 2 and answer.shape[1] <= 4
    labels = ids.clone()
    out = model(pixel_values=px, input_ids=ids, labels=labels, question_input_ids=ids)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_retrieval_reranks_only_the_top_k():
    model = PatchAlignForImageTextRetrieval(tiny_config()).eval()
    px, ids = batch(B=4)
    with torch.no_grad():
        out = model(px, ids, k=2)
    assert out.itc_scores.shape == out.i2t_scores.shape == out.t2i_scores.shape[::-1] == (4, 4)
    assert (torch.isfinite(out.i2t_scores).sum(1) == 2).all() and (torch.isfinite(out.t2i_scores).sum(1) == 2).all()
    top = out.itc_scores.topk(2, dim=1).indices
    assert torch.isfinite(out.i2t_scores.gather(1, top)).all()


# ----------------------------------------------------------------------------- processor


def _processor(tokenizer, **kw):
    ip = ViTImageProcessorPil(size={"height": 32, "width": 32})
    return PatchAlignProcessor(ip, tokenizer, patch_size=8, object_classes=list(SHAPES),
                               attributes=list(COLOURS) + ["small", "large"],
                               synonyms={s: [p] for s, p in PLURALS.items()}, **kw)


def test_processor_builds_patch_targets_on_the_processed_grid(tokenizer):
    proc = _processor(tokenizer)
    images = [Image.new("RGB", (64, 64)), Image.new("RGB", (128, 64)), Image.new("RGB", (64, 64))]
    out = proc(
        images=images,
        text=["a red circle and two squares", "a blue square", "a star"],
        boxes=[[[0, 0, 16, 16], [32, 32, 31, 31]], [[64, 0, 64, 32]], None],
        box_labels=[["circle", "triangle"], ["square"], None],
        box_attributes=[[["red", "small"], ["blue", "large"]], [["blue"]], None],
        box_features=[[[1.0] * 8, [2.0] * 8], [[3.0] * 8], None],
    )
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    # image 0: 64 -> 32 px, box [0,16)^2 -> [0,8)^2 = patch (0,0); triangle not in the caption
    assert out["patch_labels"][0].nonzero().flatten().tolist() == [0]
    # image 1: 128x64 -> 32x32 (x / 4, y / 2): box x [64,128) -> [16,32), y [0,32) -> [0,16): patches (0..1, 2..3)
    assert sorted(out["patch_labels"][1].nonzero().flatten().tolist()) == [2, 3, 6, 7]
    assert out["pta_mask"].tolist() == [True, True, False]
    assert (out["class_labels"][2] == -100).all() and out["patch_labels"][2].sum() == 0
    cl = out["class_labels"][0].view(4, 4)
    assert cl[0, 0] == SHAPES.index("circle") and cl[2, 2] == SHAPES.index("triangle") and cl[0, 3] == len(SHAPES)
    attrs = proc.attributes
    assert out["attribute_labels"][0, 0].nonzero().flatten().tolist() == sorted([attrs.index("red"), attrs.index("small")])
    assert out["attribute_mask"][0].sum() == 1 + 4 and not out["attribute_mask"][2].any()
    assert out["region_box_masks"].shape == (3, 2, 16) and out["region_mask"].tolist() == [[True, True], [True, False], [False, False]]
    assert out["region_features"][1, 0, 0] == 3.0


@pytest.mark.parametrize(
    "boxes,labels,match",
    [
        ([[[10, 10, 0, 5]]], [["circle"]], r"boxes\[0\]\[0\].*zero"),
        ([[[60, 10, 10, 5]]], [["circle"]], r"boxes\[0\]\[0\].*outside"),
        ([[[0, 0, 5, 5]]], [["zebra"]], r"box_labels\[0\].*'zebra'"),
    ],
)
def test_processor_bad_boxes_and_labels(tokenizer, boxes, labels, match):
    with pytest.raises(ValueError, match=match):
        _processor(tokenizer)(images=[Image.new("RGB", (64, 64))], text=["a circle"], boxes=boxes, box_labels=labels)


def test_processor_on_shapes_rows_feeds_the_model(tokenizer):
    ds = make_shapes_dataset(3, image_size=64)
    proc = _processor(tokenizer)
    inputs = proc(images=ds["image"], text=[c[0] for c in ds["captions"]], boxes=ds["boxes"],
                  box_labels=ds["box_labels"], box_attributes=ds["box_attributes"])
    assert inputs["pta_mask"].all() and inputs["patch_labels"].sum() > 0
    model = PatchAlignForPreTraining(tiny_config(semantic_heads=dict(object_class=dict(enabled=True),
                                                                     attribute=dict(enabled=True))))
    out = model(**inputs)
    assert out.loss_pta is not None and out.loss_object_class is not None and out.loss_attribute is not None


# ----------------------------------------------------------------------------- save / remote-code load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    # leanvlp is installed editable: drop its finder and the repo from the path, then prove it is gone
    sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    import os
    sys.path = [p for p in sys.path if p and os.path.realpath(p) != os.path.realpath(sys.argv[4])]
    try:
        import leanvlp  # noqa: F401
        raise SystemExit("leanvlp is importable in the subprocess")
    except ImportError:
        pass
    sys.modules["leanvlp"] = None
    import torch
    from transformers import AutoModelForPreTraining, AutoProcessor
    model = AutoModelForPreTraining.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    batch = torch.load(sys.argv[2], weights_only=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**batch)
    torch.save({k: v for k, v in out.items() if isinstance(v, torch.Tensor)}, sys.argv[3])
    print(type(model).__name__, type(processor).__name__)
    """
)


@pytest.mark.slow
def test_save_and_load_in_fresh_subprocess_with_remote_code(tokenizer, tmp_path):
    register(AutoEntry(PatchAlignConfig, {"AutoModel": PatchAlignModel, "AutoModelForPreTraining": PatchAlignForPreTraining},
                       PatchAlignProcessor))
    model = PatchAlignForPreTraining(tiny_config(semantic_heads=ALL_HEADS)).eval()
    proc = _processor(tokenizer)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"modeling_patch_align.py", "configuration_patch_align.py", "patch_selection.py", "semantic_heads.py",
            "token_merging.py", "vision_tower.py", "processing_patch_align.py", "boxes.py", "model.safetensors"} <= files
    ds = make_shapes_dataset(2, image_size=64)
    inputs = dict(proc(images=ds["image"], text=[c[0] for c in ds["captions"]], boxes=ds["boxes"],
                       box_labels=ds["box_labels"], box_attributes=ds["box_attributes"]))
    torch.save(inputs, tmp_path / "batch.pt")
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(**inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-I", "-c", REMOTE_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "batch.pt"),
                             str(tmp_path / "out.pt"), REPO], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PatchAlignForPreTraining PatchAlignProcessor" in result.stdout
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for name in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_lm", "loss_pta", "loss_object_class",
                 "loss_attribute", "logits_per_image", "patch_scores", "kept_patches"):
        assert torch.equal(got[name], expected[name]), name
    # the same weights load into the retrieval / generation classes (shared `patch_align.` prefix)
    gen = PatchAlignForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(gen.patch_align.logit_scale, model.patch_align.logit_scale)


# ----------------------------------------------------------------------------- distributed ITC


def _itc_worker(rank: int, world: int, port: int, feats: torch.Tensor, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = PatchAlignForPreTraining(tiny_config())
        B = feats.shape[1] // world
        image = feats[0, rank * B:(rank + 1) * B].clone().requires_grad_(True)
        text = feats[1, rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss, logits, _ = model._itc(image, text)
        loss.backward()
        torch.save({"loss": loss.detach(), "logits": logits.detach(), "image_grad": image.grad, "text_grad": text.grad},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_itc_all_gather_carries_gradients_across_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    world, B = 2, 3
    feats = torch.nn.functional.normalize(torch.randn(2, world * B, 16), dim=-1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_itc_worker, args=(world, port, feats, str(tmp_path)), nprocs=world, join=True)
    # reference: one process, the full batch; each rank's loss is the mean over its own rows
    torch.manual_seed(0)
    model = PatchAlignForPreTraining(tiny_config())
    image, text = feats[0].clone().requires_grad_(True), feats[1].clone().requires_grad_(True)
    scale = model.patch_align.logit_scale.clamp(max=torch.log(torch.tensor(1000.0))).exp()
    li2t, lt2i = scale * image @ text.t(), scale * text @ image.t()
    targets = torch.arange(world * B)
    total = 0
    for r in range(world):
        rows = slice(r * B, (r + 1) * B)
        ce = torch.nn.functional.cross_entropy
        total = total + (ce(li2t[rows], targets[rows]) + ce(lt2i[rows], targets[rows])) / 2
    total.backward()
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(got["logits"], li2t[rows].detach())
        torch.testing.assert_close(got["image_grad"], image.grad[rows])
        torch.testing.assert_close(got["text_grad"], text.grad[rows])


@pytest.mark.parametrize("keep_ratio", [0.5, 1.0])
def test_fused_token_weighting_is_a_switch(keep_ratio):
    """patch_detector.prop_attn: True (default) adds log(#fused patches) to the fused token's attention logits in
    the blocks after the detector; False keeps it a plain token. Nothing is fused at keep 1.0: equal."""
    pixels = torch.randn(2, 3, 32, 32)
    encoded = {}
    for prop in (False, True):
        torch.manual_seed(0)
        model = PatchAlignModel(tiny_config(patch_detector=dict(layer=2, keep_ratio=keep_ratio, prop_attn=prop))).eval()
        assert model.vision_tower.merging.prop_attn is prop
        with torch.no_grad():
            encoded[prop] = model.encode_image(pixels).agnostic
    if keep_ratio == 1.0:
        assert torch.equal(encoded[False], encoded[True])
    else:
        assert encoded[False].shape == encoded[True].shape == (2, 1 + 8 + 1, 32)
        assert not torch.allclose(encoded[False], encoded[True])


def test_text_longer_than_the_encoders_positions_is_refused_naming_the_limit():
    model = PatchAlignForPreTraining(tiny_config()).eval()
    px, ids = batch(B=2, T=model.config.text_config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match=r"max_position_embeddings=\d+ positions.*max_length<="):
        model(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids))
