"""MergeBridge (SimVLG): config, processor, model, generation, Hub round trips, Trainer, PEFT, video."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BertConfig,
    BertModel,
    Trainer,
    TrainingArguments,
)

from leanvlp import MergeBridgeConfig, MergeBridgeForConditionalGeneration, MergeBridgeProcessor
from leanvlp.processing.processing_merge_bridge import IGNORE_INDEX
from leanvlp.tiny import build_word_tokenizer, save_tiny_towers, tiny_image_processor, tiny_llama_config, tiny_vision_config

CORPUS = [
    "a large red circle to the left of a small blue square",
    "there is a green star above a yellow triangle",
    "question: what colour is the circle? short answer: red blue green yellow",
]
IMAGE = 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(CORPUS)


def make_config(tokenizer, **kw) -> MergeBridgeConfig:
    base = dict(
        vision_config=tiny_vision_config(IMAGE, 8, 32, 2).to_dict(),
        text_config=tiny_llama_config(len(tokenizer), 32, 2, max_position_embeddings=64).to_dict(),
        bridge_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        bridge_merging={"r": 4},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    base.update(kw)
    return MergeBridgeConfig(**base)


def make_model(tokenizer, **kw) -> MergeBridgeForConditionalGeneration:
    torch.manual_seed(0)
    return MergeBridgeForConditionalGeneration(make_config(tokenizer, **kw)).eval()


def make_processor(tokenizer, config: MergeBridgeConfig) -> MergeBridgeProcessor:
    return MergeBridgeProcessor(tiny_image_processor(IMAGE), tokenizer, num_image_tokens=config.num_image_tokens,
                                max_length=config.text_config.max_position_embeddings)


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


# ----------------------------------------------------------------------------- config


def test_derived_visual_token_count_evlgen_default():
    config = MergeBridgeConfig()  # CLIP ViT-L/14 @224 -> 257 tokens, 12 bridge layers, r = 19
    assert config.num_vision_tokens == 257
    assert config.num_image_tokens == 29
    assert config.bridge_merging == {"r": 19, "mode": "mean", "prop_attn": False, "protected": 1,
                                     "unmerged_order": "tome", "protect_relevant": 0}


@pytest.mark.parametrize(
    "merging, layers",
    [({"r": 19}, 12), ({"r": (19, -1)}, 12), ({"r": [200, 0, 5, 100]}, 4), ({"r": 500}, 3), ({"r": 0}, 2)],
)
def test_prefix_length_equals_derived_count_in_forward(tokenizer, merging, layers):
    """257 tokens (224 px / 14 px patches) through the bridge: derived count == actual prefix length,
    also for schedules that ask for more merges than the tokens allow (clipped the same way)."""
    vision = tiny_vision_config(224, 14, 16, 1, heads=2).to_dict()
    config = make_config(tokenizer, vision_config=vision, bridge_merging=merging,
                         bridge_config=dict(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                            intermediate_size=32))
    model = MergeBridgeForConditionalGeneration(config).eval()
    with torch.no_grad():
        prefix = model.get_image_features(torch.randn(1, 3, 224, 224)).pooler_output
    assert config.num_vision_tokens == 257
    assert prefix.shape == (1, config.num_image_tokens, 32)
    if merging == {"r": 19}:
        assert config.num_image_tokens == 29


def test_config_round_trip_and_bad_values(tokenizer):
    config = make_config(tokenizer, bridge_merging={"r": (4, -1), "mode": "size_weighted", "prop_attn": True})
    again = MergeBridgeConfig.from_dict(json.loads(config.to_json_string()))
    assert again.bridge_merging == config.bridge_merging and again.num_image_tokens == config.num_image_tokens
    with pytest.raises(ValueError, match="bert_like"):
        make_config(tokenizer, vision_config={"model_type": "bert_like"})
    with pytest.raises(ValueError, match="'vit' is not a causal LM"):
        make_config(tokenizer, text_config={"model_type": "vit"})
    with pytest.raises(ValueError, match="-3"):
        make_config(tokenizer, bridge_merging={"r": -3})
    with pytest.raises(ValueError, match="image_token_id"):
        MergeBridgeForConditionalGeneration(make_config(tokenizer, image_token_id=10_000))


# ----------------------------------------------------------------------------- processor and labels


def test_labels_mask_image_prompt_and_padding(tokenizer):
    config = make_config(tokenizer)
    proc = make_processor(tokenizer, config)
    batch = proc(images=images(2), text=[proc.build_prompt("caption"), proc.build_prompt("vqa", question="what colour?")],
                 targets=["a red circle", "red"])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image_id = proc.image_token_id
    assert (ids == image_id).sum(dim=1).tolist() == [config.num_image_tokens] * 2
    assert (labels[ids == image_id] == IGNORE_INDEX).all()  # image positions
    assert (labels[mask == 0] == IGNORE_INDEX).all()  # padding (right-padded for training)
    assert mask[:, 0].all()
    for row, target in enumerate(["a red circle", "red"]):
        target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        kept = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert kept == target_ids  # exactly the target + EOS: the prompt carries no loss
        n_real = int(mask[row].sum())
        assert ids[row, n_real - len(target_ids):n_real].tolist() == target_ids


def test_loss_is_computed_on_target_tokens_only(tokenizer):
    model = make_model(tokenizer)
    proc = make_processor(tokenizer, model.config)
    batch = proc(images=images(2), text=["", "question: what colour?"], targets=["a red circle", "red"])
    out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, manual)


def test_generation_inputs_are_left_padded(tokenizer):
    proc = make_processor(tokenizer, make_config(tokenizer))
    batch = proc(images=images(2), text=["", "question: what colour is the circle?"])
    assert "labels" not in batch
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][0, 0]


# ----------------------------------------------------------------------------- generation


def test_generate_greedy_beam_and_cache_consistency(tokenizer):
    model = make_model(tokenizer)
    proc = make_processor(tokenizer, model.config)
    batch = proc(images=images(2), text=[proc.build_prompt("caption"),
                                         proc.build_prompt("vqa", question="what colour is the circle?")])
    cached = model.generate(**batch, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] > batch["input_ids"].shape[1]
    assert not (cached[:, batch["input_ids"].shape[1]:] == proc.image_token_id).any()  # never generated
    beams = model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape[0] == 2 and beams.shape[1] > batch["input_ids"].shape[1]
    assert torch.equal(beams, model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False))
    full = model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(full.sequences, beams)
    texts = proc.batch_decode(cached[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_forward_takes_and_returns_the_cache_under_the_installed_name(tokenizer):
    """Prefill then one cached step equals the uncached forward: the cache crosses forward under CACHE_NAME."""
    from dataclasses import fields

    from leanvlp.modeling.modeling_merge_bridge import MergeBridgeModelOutput, MergeBridgeOutput
    from leanvlp.modeling.transformers_compat import CACHE_NAME

    assert all(CACHE_NAME in {f.name for f in fields(cls)} for cls in (MergeBridgeOutput, MergeBridgeModelOutput))
    model = make_model(tokenizer)
    proc = make_processor(tokenizer, model.config)
    prompts = [proc.build_prompt("vqa", question=q) for q in ("what colour is the circle?", "what colour?")]
    batch = proc(images=images(2), text=prompts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        full = model(**batch).logits[:, -1]  # (B, V)
        prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], pixel_values=batch["pixel_values"],
                        use_cache=True)
        cache = prefill[CACHE_NAME]
        assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
        step = model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{CACHE_NAME: cache}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(tokenizer):
    model = make_model(tokenizer)
    proc = make_processor(tokenizer, model.config)
    with pytest.raises(ValueError, match="2 images/videos but 1"):
        proc(images=images(2), text=["<image> a", "no placeholder"])
    with pytest.raises(ValueError, match="max_length=64"):
        proc(images=images(1), text=["red " * 80])
    with pytest.raises(ValueError, match="zero frames"):
        proc(videos=[[]], text=[""])
    batch = proc(images=images(1), text=[""])
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="zero frames"):
        model.get_image_features(torch.zeros(1, 0, 3, IMAGE, IMAGE))


# ----------------------------------------------------------------------------- training behaviour


def test_frozen_towers_stay_bit_identical_after_a_step(tokenizer):
    model = make_model(tokenizer).train()
    proc = make_processor(tokenizer, model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**proc(images=images(2), text=["", ""], targets=["a red circle", "a blue square"])).loss.backward()
    opt.step()
    after = model.state_dict()
    for name, value in after.items():
        if name.startswith(("model.vision_tower.", "model.language_model.", "lm_head.")):
            assert torch.equal(before[name], value), name
    assert any(not torch.equal(before[n], v) for n, v in after.items() if n.startswith("model.bridge."))


def test_gradient_checkpointing_gives_the_same_loss_and_bridge_gradients(tokenizer):
    proc = make_processor(tokenizer, make_config(tokenizer))
    batch = proc(images=images(2), text=["", ""], targets=["a red circle", "a blue square"])
    grads = []
    for checkpointing in (False, True):
        model = make_model(tokenizer).train()
        for module in model.modules():  # dropout off, so both runs compute the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            # 5.24 renamed it activation_checkpointing_enable (the old name warns)
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            assert all(layer.gradient_checkpointing for layer in model.language_model.layers)
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for n, p in model.named_parameters() if n.startswith("model.bridge.")]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for plain, checkpointed in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(plain, checkpointed)


def test_gradient_accumulation_logs_the_same_loss_as_a_full_batch(tokenizer, tmp_path):
    config = make_config(tokenizer)
    proc = make_processor(tokenizer, config)
    targets = ["a red circle", "a blue square", "a green star", "a yellow triangle"] * 2  # equal lengths
    batch = proc(images=images(8), text=[""] * 8, targets=targets)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]

    def first_logged_loss(per_device: int, accumulation: int) -> float:
        torch.manual_seed(0)
        model = MergeBridgeForConditionalGeneration(config)
        args = TrainingArguments(output_dir=str(tmp_path / f"run{accumulation}"), per_device_train_batch_size=per_device,
                                 gradient_accumulation_steps=accumulation, max_steps=1, logging_steps=1,
                                 learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                                 remove_unused_columns=False, dataloader_drop_last=True, seed=0,
                                 disable_tqdm=True)
        collate = lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]}  # noqa: E731
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        trainer.train()
        return next(h["loss"] for h in trainer.state.log_history if "loss" in h)

    full = first_logged_loss(8, 1)
    accumulated = first_logged_loss(4, 2)
    assert accumulated == pytest.approx(full, rel=0.02)


def test_lora_on_llm_with_bridge_saved_and_reloaded(tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = make_model(tokenizer)
    proc = make_processor(tokenizer, model.config)
    batch = proc(images=images(2), text=["", ""], targets=["a red circle", "a blue square"])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                      modules_to_save=["bridge"])
    peft_model = get_peft_model(model, lora)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".bridge." in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(2):
        opt.zero_grad()
        peft_model(**batch).loss.backward()
        opt.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_model(tokenizer), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)


# ----------------------------------------------------------------------------- video


def test_video_with_zero_gate_equals_frame_mean_of_image_features(tokenizer):
    model = make_model(tokenizer, temporal_merging=True, temporal_dim=16, temporal_heads=2)
    assert all(layer.gate.item() == 0.0 for layer in model.temporal.layers)
    video = torch.randn(2, 3, 3, IMAGE, IMAGE)  # (B, T, 3, H, W)
    with torch.no_grad():
        video_prefix = model.get_image_features(video).pooler_output
        per_frame = torch.stack([model.vision_tower(video[:, t]).last_hidden_state for t in range(3)], dim=1)
        expected = model.bridge(per_frame.mean(dim=1)).last_hidden_state
    torch.testing.assert_close(video_prefix, expected, rtol=0, atol=1e-6)
    # a non-zero gate changes the features, and the temporal parameters are the only trainable vision ones
    with torch.no_grad():
        for layer in model.temporal.layers:
            layer.gate.fill_(0.5)
        assert not torch.allclose(model.get_image_features(video).pooler_output, video_prefix)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.bridge.")]
    assert trainable and all(n.startswith("model.temporal.") for n in trainable)


def test_processor_accepts_videos(tokenizer):
    model = make_model(tokenizer, temporal_merging=True, temporal_dim=16, temporal_heads=2)
    proc = make_processor(tokenizer, model.config)
    batch = proc(videos=[images(3, seed=1), images(3, seed=2)], text=["", ""], targets=["a red circle moves", "a star"])
    assert batch["pixel_values"].shape == (2, 3, 3, IMAGE, IMAGE)
    assert torch.isfinite(model(**batch).loss)


# ----------------------------------------------------------------------------- checkpoints and the Hub


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    vision_dir, text_dir = save_tiny_towers(root, CORPUS, image_size=IMAGE, vision_hidden=32, llm_hidden=32)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64, vocab_size=30))
    bert.save_pretrained(root / "bert")
    return vision_dir, text_dir, root / "bert"


def test_from_vision_text_pretrained_and_processor(towers):
    vision_dir, text_dir, bert_dir = towers
    model = MergeBridgeForConditionalGeneration.from_vision_text_pretrained(
        str(vision_dir), str(text_dir), bridge_init=str(bert_dir), bridge_merging={"r": 3})
    proc = MergeBridgeProcessor.from_vision_text_pretrained(str(vision_dir), str(text_dir), config=model.config)
    assert proc.num_image_tokens == model.config.num_image_tokens == 17 - 6
    assert proc.image_token_id == model.config.image_token_id
    bert = BertModel.from_pretrained(bert_dir)
    torch.testing.assert_close(model.bridge.encoder.layers[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight)
    from transformers import AutoModel

    vision = AutoModel.from_pretrained(vision_dir)
    torch.testing.assert_close(model.vision_tower.vision_model.embeddings.patch_embeddings.projection.weight,
                               vision.embeddings.patch_embeddings.projection.weight)
    assert not any(p.requires_grad for p in model.language_model.parameters())
    out = model(**proc(images=images(1), text=[""], targets=["a red circle"]))
    assert torch.isfinite(out.loss)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["leanvlp"] = None  # the package must not be importable: remote code only
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    batch = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save(logits, sys.argv[3])
    print(type(model).__name__, type(processor).__name__)
    """
)


def test_save_and_load_in_fresh_subprocess_with_remote_code(tokenizer, tmp_path):
    model = make_model(tokenizer, bridge_merging={"r": 3, "mode": "size_weighted", "prop_attn": True})
    proc = make_processor(tokenizer, model.config)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"modeling_merge_bridge.py", "configuration_merge_bridge.py", "token_merging.py", "vision_tower.py",
            "processing_merge_bridge.py", "model.safetensors"} <= files
    batch = dict(proc(images=images(2), text=["", "question: what colour?"]))
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).logits
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "batch.pt"),
                             str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MergeBridgeForConditionalGeneration MergeBridgeProcessor" in result.stdout
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)
    # With leanvlp installed, no trust_remote_code is needed, and the classes are leanvlp's own.
    local = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt").eval()
    assert type(local) is MergeBridgeForConditionalGeneration
    assert isinstance(AutoProcessor.from_pretrained(tmp_path / "ckpt"), MergeBridgeProcessor)
    with torch.no_grad():
        assert torch.equal(local(**batch).logits, expected)


def test_pipeline_image_text_to_text(tokenizer, tmp_path):
    from transformers import pipeline

    model = make_model(tokenizer)
    model.save_pretrained(tmp_path)
    make_processor(tokenizer, model.config).save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    out = pipe(images=images(1)[0], text="<image>question: what colour?", max_new_tokens=4)
    assert isinstance(out[0]["generated_text"], str)
