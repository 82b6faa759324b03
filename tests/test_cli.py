"""train.py and eval.py as a new user meets them: a short grouped --help, one-line usage errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from leanvlp.evaluation import main as eval_main
from leanvlp.evaluation.arguments import build_parser as eval_parser
from leanvlp.training import main as train_main
from leanvlp.training.arguments import build_parser as train_parser

ROOT = Path(__file__).resolve().parents[1]


def test_train_help_is_short_grouped_and_lists_config_and_the_full_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) < 120  # the full Trainer help is ~700 lines
    assert "--config FILE.yaml" in text and "--help-all" in text
    titles = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert titles[:4] == ["examples:", "config:", "model:", "tiny models built from scratch (no --checkpoint / "
                                                              "--vision_model):"]
    assert titles[-1].startswith("training (transformers.TrainingArguments")
    assert text.index("--family") < text.index("--dataset") < text.index("--learning_rate")  # leanvlp's first
    # every leanvlp flag has a help text, and a non-None default is shown once
    for name in ("family", "bridge_layers", "tiny_image_size", "lora_alpha", "num_train_images", "max_new_tokens"):
        line = next(l for l in lines if l.startswith(f"  --{name} "))
        assert len(line.split(maxsplit=2)) == 3, line
    assert next(l for l in lines if l.startswith("  --bridge_layers ")).count("(default: 2)") == 1
    assert "--adam_beta1" not in text  # Trainer's long tail stays in --help-all


def test_train_help_all_lists_every_trainer_flag(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help-all"])
    text = capsys.readouterr().out
    assert "--adam_beta1" in text and "--config" in text


def test_eval_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    text = capsys.readouterr().out
    split = next(l for l in text.splitlines() if l.startswith("  --split "))
    assert "(default: None)" not in text and split.count("default") == 1
    assert "(required)" in next(l for l in text.splitlines() if l.startswith("  --model "))


@pytest.mark.parametrize(("argv", "message"), [
    (["--dataset", "coco"], "--dataset coco: --data_path is required"),
    (["--lr", "0.1"], "unknown argument(s) --lr 0.1 (did you mean --learning_rate?)"),
    (["--num_train_epochs", "abc"], "invalid float value: 'abc'"),
    (["--family", "blip9"], "unknown model family 'blip9'"),
    (["--config", "nope.yaml"], "--config: no such file 'nope.yaml'"),
    (["--num_eval_images", "-1"], "--num_eval_images must be >= 0, got -1"),
    (["--bridge_r", "a,b"], "--bridge_r: expected integers"),
    (["--tiny_vision_init", "imagenet"], "--tiny_vision_init: expected one of ('shapes', 'random'), got 'imagenet'"),
    (["--tiny_vision_hidden", "128", "--tiny_vision_init", "shapes"],
     "--tiny_vision_hidden 128 with --tiny_vision_init shapes"),
    (["--family", "patch_align", "--task", "pretrain", "--tiny_vision_init", "shapes"],
     "--tiny_vision_init shapes: the embedded shapes tower starts a MergeBridge built from scratch"),
])
def test_train_usage_errors_are_one_line_and_exit_code_2(argv, message, capsys):
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1


def test_eval_missing_required_flag_is_one_line():
    parser = eval_parser()
    with pytest.raises(ValueError, match="the following arguments are required: --model"):
        parser.parse(["--task", "caption"])


@pytest.mark.slow  # three fresh interpreters importing torch and transformers
@pytest.mark.parametrize(("script", "argv", "code", "stream", "text"), [
    ("train.py", ["--dataset", "hf"], 2, "stderr", "train.py: error: --dataset hf: --data_path is required"),
    ("eval.py", ["--task", "caption"], 2, "stderr", "leanvlp-eval: error: the following arguments are required"),
    ("train.py", ["--help"], 0, "stdout", "usage: train.py"),
])
def test_scripts_exit_codes_in_a_fresh_process(script, argv, code, stream, text):
    done = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == code
    out = getattr(done, stream)
    assert out.startswith(text) and "Traceback" not in done.stderr
    if code == 2:
        assert out.count("\n") == 1


def test_train_parser_has_no_abbreviations():
    with pytest.raises(ValueError, match="unknown argument"):
        train_parser().parse(["--learning", "0.1"])
