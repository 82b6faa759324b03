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

from leanvlp.training import (
    LeanTrainer,
    MergeBridgeCollator,
    build_merge_bridge,
    corpus_of,
    load_schema_data,
    main,
    parse_args,
    parse_r,
    to_pairs,
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
    out = tmp_path / "run"
    assert main(["--config", str(config), *FAST, "--output_dir", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    assert (out / "README.md").is_file() and (out / "loss_curve.png").is_file()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2
    results = json.loads((out / "eval_results.json").read_text())["results"][0]
    assert results["metrics"]["token_accuracy"] >= 0.0
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert reloaded.config.num_image_tokens == summary["visual_tokens"]


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
    flags = [*FAST, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--learning_rate", "0.003"]

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
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_args(["--config", "nope.yaml"])


def test_missing_column_and_empty_dataset(tmp_path):
    from datasets import Dataset

    from leanvlp.data import make_shapes_dataset

    shapes = make_shapes_dataset(2, image_size=32)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['captions'\]"):
        to_pairs(shapes.remove_columns("captions"), "caption")
    with pytest.raises(ValueError, match="empty"):
        to_pairs(shapes.select([]), "caption")


def test_corrupt_image_fails_fast_naming_the_sample_or_is_skipped_and_counted():
    from leanvlp.data import make_shapes_dataset
    from leanvlp.tiny import build_word_tokenizer

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
    at every step within 2e-3 (the two runs reduce in a different order; token counts per sample differ)."""
    flags = [*FAST, "--max_steps", "3", "--save_strategy", "no", "--learning_rate", "0.003"]
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
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(single) == sorted(double) == ["1", "2", "3"]
    for step in single:
        assert double[step] == pytest.approx(single[step], abs=2e-3), (step, single, double)
