"""train.py / leanvlp.training: configs, resume, LoRA, bad input, Hub push offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from leanvlp.data.collate import MergeBridgeCollator
from leanvlp.data.pairs import to_pairs
from leanvlp.training import (
    LeanTrainer,
    build_merge_bridge,
    corpus_of,
    load_schema_data,
    main,
    parse_args,
    parse_r,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SMALL = [p for p in CONFIGS if p.name.startswith("tiny")]
FAST = ["--num_train_images", "24", "--num_eval_images", "4", "--max_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "8", "--save_strategy", "no", "--max_new_tokens", "3",
        "--tiny_image_size", "32", "--bridge_r", "4", "--tiny_llm_hidden", "32", "--bridge_hidden", "32",
        "--tiny_vision_hidden", "32", "--disable_tqdm", "true"]


def test_no_argument_defaults_equal_the_tiny_cpu_config():
    assert parse_args([]) [:2] == parse_args(["--config", str(ROOT / "configs/tiny_cpu.yaml")])[:2]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(config):
    model_args, data_args, train_args = parse_args(["--config", str(config)])
    assert train_args.output_dir
    parse_r(model_args.bridge_r)


def test_flags_override_config_keys():
    model_args, data_args, train_args = parse_args(["--config", str(ROOT / "configs/tiny_vqa.yaml"),
                                                    "--task", "caption", "--learning_rate", "0.5"])
    assert data_args.task == "caption" and train_args.learning_rate == 0.5
    assert model_args.bridge_r == "16,-1"  # from the file


@pytest.mark.slow
@pytest.mark.parametrize("config", SMALL, ids=lambda p: p.name)
def test_each_small_config_trains_a_few_steps(config, tmp_path):
    """FAST's flags fit both families (MergeBridge-only flags such as --bridge_r are ignored by PatchAlign)."""
    out = tmp_path / "run"
    assert main(["--config", str(config), *FAST, "--output_dir", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    assert (out / "README.md").is_file() and (out / "loss_curve.png").is_file()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2
    if summary["task"] != "pretrain":  # a held-out LM loss: Trainer found the labels it needs in the batch
        assert summary["eval_loss"] is not None and summary["eval_loss"] > 0
    results = json.loads((out / "eval_results.json").read_text())["results"][0]
    assert (results["dataset"], results["split"], results["num_images"]) == ("leanvlp-shapes", "held-out[:4]", 4)
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    if summary["family"] == "patch_align":
        assert results["task"] == "retrieval" and 0.0 <= results["metrics"]["i2t_r1"] <= 1.0
        assert 0.0 <= results["metrics"]["pta_precision"] <= 1.0
        config = reloaded.config  # CLS + kept patches + 1 fused token
        assert summary["visual_tokens"] == 1 + config.num_kept_patches + 1 < 1 + config.num_patches
        auto_map = json.loads((out / "config.json").read_text())["auto_map"]  # remote code for every head
        assert auto_map["AutoModelForImageTextToText"] == "modeling_patch_align.PatchAlignForConditionalGeneration"
        logged = summary["logged"]
        assert sorted(logged) == ["1", "2"] and all(h["itc_columns"] == 8 for h in logged.values())
        assert {"loss_itc", "loss_itm", "loss_mlm", "loss_lm", "loss_pta", "loss_object_class",
                "loss_attribute"} == {k for k in logged["1"] if k.startswith("loss_")}
    else:
        assert results["metrics"]["token_accuracy"] >= 0.0
        assert reloaded.config.num_image_tokens == summary["visual_tokens"]


def test_train_and_eval_score_the_same_held_out_images():
    """One held-out split: train.py's before/after images are eval.py's default ones, and no training image."""
    from leanvlp.evaluation import EvalArguments, load_eval_data

    model_args, data_args, _ = parse_args(FAST)
    train, held_out = load_schema_data(data_args, model_args.tiny_image_size)
    evaluated = load_eval_data(EvalArguments(model="unused", task="caption", num_images=4), 32)
    assert held_out["image_id"] == evaluated["image_id"] == [f"shapes-0-{1_000_000 + i}" for i in range(4)]
    assert held_out["captions"] == evaluated["captions"]
    assert train["image_id"] == [f"shapes-0-{i}" for i in range(24)]
    assert main([*FAST, "--num_train_images", "1000001"]) == 2  # would reach into the held-out images


def test_lora_run_changes_only_adapters_and_bridge(tmp_path):
    from peft import PeftModel

    import leanvlp  # noqa: F401  (registers the Auto classes)

    model_args, data_args, train_args = parse_args([*FAST, "--lora_r", "4", "--freeze_llm", "true",
                                                    "--output_dir", str(tmp_path)])
    train, _ = load_schema_data(data_args, model_args.tiny_image_size)
    model, processor = build_merge_bridge(model_args, corpus_of(train))
    from leanvlp.training import apply_lora

    peft_model = apply_lora(model, model_args)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainer = LeanTrainer(model=peft_model, args=train_args, train_dataset=to_pairs(train, "caption"),
                          data_collator=MergeBridgeCollator(processor, "caption"))
    trainer.train()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n or ".bridge." in n for n in changed)
    trainer.save_model(str(tmp_path / "adapter"))
    fresh, _ = build_merge_bridge(model_args, corpus_of(train))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, dict(peft_model.named_parameters())[name])


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


def _losses(log_history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in log_history if "loss" in h}


def test_resume_reaches_the_same_losses_as_an_uninterrupted_run(tmp_path):
    """Stop at step 3 (checkpoint saved), resume to step 6: the losses at steps 4..6 equal an uninterrupted
    run's to 1e-5 (CPU, fixed seed)."""
    # the vision tower trains too: its attention weights are saved in ViT's checkpoint layout, which Trainer's own
    # resume (a plain load_state_dict) would miss
    flags = [*FAST, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--learning_rate", "0.003",
             "--freeze_vision", "false"]

    def run(out: Path, stop: int | None = None, resume: str | None = None) -> dict[int, float]:
        model_args, data_args, train_args = parse_args([*flags, "--output_dir", str(out)])
        train, _ = load_schema_data(data_args, model_args.tiny_image_size)
        torch.manual_seed(train_args.seed)
        model, processor = build_merge_bridge(model_args, corpus_of(train))
        trainer = LeanTrainer(model=model, args=train_args, train_dataset=to_pairs(train, "caption"),
                              data_collator=MergeBridgeCollator(processor, "caption"),
                              callbacks=[_StopAt(stop)] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return _losses(trainer.state.log_history)

    full = run(tmp_path / "full")
    first = run(tmp_path / "split", stop=3)
    assert sorted(first) == [1, 2, 3]
    resumed = run(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-3"))
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-5), (step, resumed, full)
    checkpoint_files = {p.name for p in (tmp_path / "split" / "checkpoint-3").iterdir()}
    assert "model.safetensors" in checkpoint_files and "pytorch_model.bin" not in checkpoint_files


# ----------------------------------------------------------------------------- bad input


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model family 'blip9'"):
        parse_args(["--family", "blip9"])
    with pytest.raises(ValueError, match="unknown task 'dance'"):
        parse_args(["--task", "dance"])
    with pytest.raises(ValueError, match="unknown dataset kind 'imagenet'"):
        parse_args(["--dataset", "imagenet"])
    with pytest.raises(ValueError, match="--bridge_r"):
        parse_r("sixteen")
    with pytest.raises(ValueError, match="no such file 'nope.yaml'"):  # a UsageError: exit code 2 (test_cli)
        parse_args(["--config", "nope.yaml"])


def test_missing_column_and_empty_dataset(tmp_path):

    from leanvlp.data import make_shapes_dataset

    shapes = make_shapes_dataset(2, image_size=32)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['captions'\]"):
        to_pairs(shapes.remove_columns("captions"), "caption")
    with pytest.raises(ValueError, match="empty"):
        to_pairs(shapes.select([]), "caption")
    no_questions = shapes.map(lambda row: {"questions": [], "answers": []})
    with pytest.raises(ValueError, match=r"'questions' / 'answers' are empty in every one of the 2 rows, so task 'vqa' has no pairs"):
        to_pairs(no_questions, "vqa")


def test_corrupt_image_fails_fast_naming_the_sample_or_is_skipped_and_counted():
    from leanvlp.data import make_shapes_dataset

    model_args, _, _ = parse_args(FAST)
    pairs = to_pairs(make_shapes_dataset(3, image_size=32), "caption")
    rows = [pairs[i] for i in range(len(pairs))]
    rows[1] = {**rows[1], "image": {"bytes": b"not a png", "path": None}}
    bad_id = rows[1]["image_id"]
    _, processor = build_merge_bridge(model_args, [r["target"] for r in rows])
    with pytest.raises(ValueError, match=bad_id):
        MergeBridgeCollator(processor, "caption")(rows)
    collator = MergeBridgeCollator(processor, "caption", skip_bad_samples=True)
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == len(rows) - 1 and collator.skipped == [bad_id]


def test_push_to_hub_offline_is_one_clear_error_and_keeps_the_checkpoint(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *FAST, "--output_dir", str(tmp_path / "run"),
                             "--push_to_hub", "true", "--hub_model_id", "someone/tiny"],
                            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("push_to_hub failed")]
    assert len(errors) == 1 and "saved locally" in errors[0]
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_process_run_matches_one_process_run_with_the_same_global_batch(tmp_path):
    """accelerate launch --num_processes 2 (CPU, gloo) with 4 per device == 1 process with 8: same logged loss
    at every step within 2e-3 (the two runs reduce in a different order; token counts per sample differ). The
    bridge's dropout is off: each process draws its own masks, so with dropout the runs differ by chance."""
    # all captions and a frozen tower, as this test was written: each process averages its own tokens' loss, so the
    # two runs differ by how unequal caption lengths are across processes (consensus captions vary more)
    flags = [*FAST, "--max_steps", "3", "--save_strategy", "no", "--learning_rate", "0.003", "--bridge_dropout", "0",
             "--train_captions", "all", "--freeze_vision", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def losses(out: Path) -> dict[str, float]:
        return json.loads((out / "training_summary.json").read_text())["losses"]

    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--per_device_train_batch_size", "8",
                          "--output_dir", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", "0",
                          str(ROOT / "train.py"), *flags, "--per_device_train_batch_size", "4",
                          "--output_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "training_summary.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "one" / "config.json").read_text())["bridge_config"]["hidden_dropout_prob"] == 0
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(single) == sorted(double) == ["1", "2", "3"]
    for step in single:
        assert double[step] == pytest.approx(single[step], abs=2e-3), (step, single, double)


# ----------------------------------------------------------------------------- PatchAlign

PATCH_ALIGN = ["--config", str(ROOT / "configs/tiny_patch_align.yaml"), *FAST]


@pytest.mark.slow
def test_patch_align_two_process_run_matches_one_process_run_and_itc_sees_both_processes(tmp_path):
    """accelerate launch --num_processes 2 (CPU, gloo) with 4 per device vs 1 process with 8, PatchAlign pretraining.

    - ITC gathers features from every process: its logits have 8 columns (the global batch) in both runs.
    - MLM masks come from per-sample seeds (`sample_seeds`), identical in both runs; tiny BERT has no dropout.
    - ITM's hard negatives are drawn among the *local* batch (4 vs 8 candidates), so loss_itm and, after the first
      update, every term differ a little. So: at step 1 (same weights) ITC, PTA and the object-class loss (every
      sample annotated, every patch labelled: equal counts per process) agree to 1e-4; MLM, LM and attribute terms
      (per-process means over different token / patch counts) to 5e-2; the total at every step to 0.05 (~0.3% of
      ~14; measured: within 0.012).
    """
    flags = [*PATCH_ALIGN, "--max_steps", "3", "--learning_rate", "0.003"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def summary(out: Path) -> dict:
        return json.loads((out / "training_summary.json").read_text())

    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--per_device_train_batch_size", "8",
                          "--output_dir", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", "0",
                          str(ROOT / "train.py"), *flags, "--per_device_train_batch_size", "4",
                          "--output_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert double["world_size"] == 2 and single["world_size"] == 1
    assert sorted(single["logged"]) == sorted(double["logged"]) == ["1", "2", "3"]
    for step in ("1", "2", "3"):
        assert single["logged"][step]["itc_columns"] == double["logged"][step]["itc_columns"] == 8
        assert double["losses"][step] == pytest.approx(single["losses"][step], abs=0.05), (step, single, double)
    first_one, first_two = single["logged"]["1"], double["logged"]["1"]
    for term in ("loss_itc", "loss_pta", "loss_object_class"):
        assert first_two[term] == pytest.approx(first_one[term], abs=1e-4), (term, first_one, first_two)
    for term in ("loss_mlm", "loss_lm", "loss_attribute"):
        assert first_two[term] == pytest.approx(first_one[term], abs=5e-2), (term, first_one, first_two)


def _patch_align_setup(task: str = "pretrain", extra: tuple[str, ...] = ()):
    from leanvlp.training import annotation_vocab, build_patch_align

    model_args, data_args, train_args = parse_args([*PATCH_ALIGN, "--task", task, *extra])
    train, _ = load_schema_data(data_args, model_args.tiny_image_size)
    model, processor = build_patch_align(model_args, task, corpus_of(train), annotation_vocab(train))
    return model, processor, to_pairs(train, task, annotations=True)


def test_patch_align_collator_passes_boxes_and_per_sample_mlm_seeds():
    from leanvlp.modeling.modeling_patch_align import mask_tokens
    from leanvlp.data.collate import PatchAlignCollator

    model, processor, pairs = _patch_align_setup()
    rows = [pairs[i] for i in range(6)]
    assert rows[0]["image_id"] == rows[1]["image_id"] and rows[0]["boxes"] == rows[1]["boxes"]  # per caption
    collator = PatchAlignCollator(processor, "pretrain", boxes=True)
    batch = collator(rows)
    tok = processor.tokenizer
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all() and tok.mask_token_id == model.config.mask_token_id
    assert batch["pta_mask"].all() and batch["patch_labels"].shape == (6, model.config.num_patches)
    assert batch["class_labels"].shape == (6, model.config.num_patches) and "attribute_labels" in batch
    unannotated = collator([{**rows[0], "boxes": [], "box_labels": [], "box_attributes": []}, rows[1]])
    assert unannotated["pta_mask"].tolist() == [False, True]
    # a sample's seed, hence its MLM mask, does not depend on its batch (other rows, padding); the epoch changes it
    alone = collator([rows[3]])
    assert alone["sample_seeds"][0] == batch["sample_seeds"][3]
    cfg = model.config

    def mask(b, row):
        ids, labels = mask_tokens(b["input_ids"], b["attention_mask"], cfg.mask_token_id, cfg.text_config.vocab_size,
                                  [0, cfg.cls_token_id, cfg.sep_token_id], 0.5, sample_seeds=b["sample_seeds"])
        n = int(b["attention_mask"][row].sum())
        return ids[row, :n], labels[row, :n]

    for got, want in zip(mask(alone, 0), mask(batch, 3)):
        assert torch.equal(got, want)
    collator.epoch = 1
    assert collator([rows[3]])["sample_seeds"][0] != alone["sample_seeds"][0]
    out = model(**batch)
    assert out.loss_pta is not None and out.loss_object_class is not None and out.logits_per_image.shape == (6, 6)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["retrieval", "caption", "vqa"])
def test_patch_align_fine_tuning_tasks_train_and_report(task, tmp_path):
    out = tmp_path / task
    assert main([*PATCH_ALIGN, "--task", task, "--max_steps", "1", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    metrics = json.loads((out / "eval_results.json").read_text())["results"][0]["metrics"]
    terms = {k for k in summary.get("logged", {}).get("1", {}) if k.startswith("loss_")}
    if task == "retrieval":  # ITC + ITM (MLM is computed with weight 0; the LM is skipped; no boxes, no PTA)
        assert terms == {"loss_itc", "loss_itm", "loss_mlm"} and "i2t_r1" in metrics
        assert summary["losses"]["1"] == pytest.approx(summary["logged"]["1"]["loss_itc"]
                                                       + summary["logged"]["1"]["loss_itm"], abs=1e-3)
    else:
        assert "logged" not in summary and "token_accuracy" in metrics  # no empty per-step dicts
        assert ("vqa_accuracy" if task == "vqa" else "cider") in metrics
    config = json.loads((out / "config.json").read_text())
    expected = {"retrieval": "PatchAlignForPreTraining", "caption": "PatchAlignForConditionalGeneration",
                "vqa": "PatchAlignForQuestionAnswering"}[task]
    assert config["architectures"] == [expected]


def test_patch_align_from_pretrained_towers_copies_their_weights(tmp_path):
    """A tiny ViT and a tiny BERT saved as ordinary checkpoints: the built model holds their weights, and the
    fusion / decoder layers start from the text encoder's last layers (cross-attention new)."""
    from transformers import BertConfig, BertModel, ViTModel

    from leanvlp import PatchAlignForPreTraining, PatchAlignModel
    from leanvlp.tiny import tiny_image_processor, tiny_vision_config
    from leanvlp.tiny import build_bert_word_tokenizer

    torch.manual_seed(0)
    vision = ViTModel(tiny_vision_config(32, 8, 32, 4))  # with a pooler, which PatchAlign drops
    vision.save_pretrained(tmp_path / "vit")
    tiny_image_processor(32).save_pretrained(tmp_path / "vit")
    tokenizer = build_bert_word_tokenizer(["a red circle", "two blue squares"])
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    model = PatchAlignForPreTraining.from_vision_text_pretrained(
        str(tmp_path / "vit"), str(tmp_path / "bert"), num_fusion_layers=2, num_decoder_layers=1, embed_dim=16,
        patch_detector=dict(layer=2, keep_ratio=0.5))
    pa = model.patch_align
    assert (model.config.cls_token_id, model.config.mask_token_id) == (tokenizer.cls_token_id, tokenizer.mask_token_id)
    for name, value in vision.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(pa.vision_tower.vision_model.state_dict()[name], value), name
    for name, value in bert.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(pa.text_model.state_dict()[name], value), name
    layers = bert.encoder.layer
    for fused, source in ((pa.fusion_layers[0], layers[1]), (pa.fusion_layers[1], layers[2]),
                          (pa.decoder_layers[0], layers[2])):
        for name, value in source.state_dict().items():
            assert torch.equal(fused.state_dict()[name], value), name
    assert isinstance(PatchAlignModel.from_vision_text_pretrained(str(tmp_path / "vit"), str(tmp_path / "bert"),
                                                                  patch_detector=dict(layer=2)), PatchAlignModel)
    with pytest.raises(ValueError, match="model_type 'vit'.*BERT"):
        PatchAlignForPreTraining.from_vision_text_pretrained(str(tmp_path / "vit"), str(tmp_path / "vit"))


def test_patch_align_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="--lora_r 4.*PatchAlign"):
        parse_args([*PATCH_ALIGN, "--lora_r", "4"])
    with pytest.raises(ValueError, match=r"unknown head\(s\) \['colour'\]"):
        parse_args([*PATCH_ALIGN, "--semantic_heads", "colour"])
    with pytest.raises(ValueError, match="--keep_ratio must be in"):
        parse_args([*PATCH_ALIGN, "--keep_ratio", "1.5"])
    with pytest.raises(ValueError, match="region_feature needs teacher features"):
        _patch_align_setup(extra=("--semantic_heads", "region_feature"))


def test_streaming_datasets_folder_with_column_mapping_trains_with_max_steps(tmp_path):
    """--dataset hf --streaming: an IterableDataset, mapped from a renamed caption column, runs max_steps."""
    from leanvlp.data import make_shapes_dataset

    make_shapes_dataset(24, image_size=32).rename_column("captions", "text").save_to_disk(tmp_path / "data")
    out = tmp_path / "run"
    assert main([*FAST, "--dataset", "hf", "--data_path", str(tmp_path / "data"), "--caption_column", "text",
                 "--streaming", "true", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and sorted(summary["losses"]) == ["1", "2"]
