"""Every command in README.md is exercised, so the examples cannot rot.

Shell lines that run offline in under a minute run as written (in a scratch folder holding the scripts and configs,
with a tiny model trained there first where they need `outputs/tiny-merge-bridge`); `train.py` runs of minutes have
their flags parsed by train.py's own parser; the rest (installs, downloads, multi-process launches, long benchmarks,
the test suite itself) are skipped with the reason printed. Python snippets run as written, with tiny stand-ins
saved under the Hub ids they name (a local folder of that name wins over the Hub), or are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S)
FAST = ["--num_train_images", "24", "--num_eval_images", "4", "--max_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "8", "--save_strategy", "no", "--max_new_tokens", "3",
        "--tiny_image_size", "32", "--bridge_r", "4", "--tiny_llm_hidden", "32", "--bridge_hidden", "32",
        "--tiny_vision_hidden", "32", "--disable_tqdm", "true"]

# first words of a shell line -> why it does not run here
SKIPPED = {
    "python3 -m venv": "creates a venv and installs packages (network, minutes)",
    "pip install": "installs packages (network)",
    ". .venv/bin/activate": "runs the whole test suite (this test is part of it)",
    "accelerate launch": "several processes on a GPU-scale config",
    "python benchmarks/": "a benchmark of minutes (its numbers are in the Results table)",
    "python scripts/prepare_assets.py": "converts real pretrained weights (needs the assets extras)",
    "LEANVLP_ASSETS=": "the small-scale reproduction (38 min, real weights)",
}
PARSED_ONLY = "python train.py"  # minutes of training: its flags are checked by train.py's parser (--help runs)


def shell_lines() -> list[str]:
    """Every command line of the README's bash blocks (comments stripped)."""
    lines = []
    for kind, body in BLOCKS:
        if kind == "bash":
            lines += [line.split("  #")[0].strip() for line in body.splitlines()
                      if line.strip() and not line.lstrip().startswith("#")]
    return lines


def python_snippets() -> list[str]:
    return [body for kind, body in BLOCKS if kind == "python"]


def test_readme_has_the_commands_this_test_knows():
    lines = shell_lines()
    assert any(line == "python train.py" for line in lines)
    assert any(line.startswith("python eval.py") for line in lines)
    assert len(python_snippets()) >= 3


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder like a fresh checkout's root (scripts, configs) with a tiny model in outputs/tiny-merge-bridge."""
    from leanvlp.training import main as train

    folder = tmp_path_factory.mktemp("readme")
    for name in ("train.py", "eval.py", "configs", "leanvlp", "scripts"):
        (folder / name).symlink_to(ROOT / name)
    assert train([*FAST, "--output_dir", str(folder / "outputs" / "tiny-merge-bridge")]) == 0
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("line", shell_lines())
def test_readme_shell_line(line: str, scratch: Path, capsys):
    reason = next((why for start, why in SKIPPED.items() if line.startswith(start)), None)
    if reason:
        with capsys.disabled():
            print(f"\nREADME line not run: {line!r}: {reason}")
        pytest.skip(reason)
    words = shlex.split(line)
    if line.startswith(PARSED_ONLY) and "--help" not in words:
        from leanvlp.training import parse_args

        cwd = os.getcwd()
        os.chdir(scratch)  # config paths are relative to the repository root
        try:
            parse_args(words[2:])
        finally:
            os.chdir(cwd)
        return
    assert words[0] == "python", f"a README command this test does not know how to run: {line!r}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *words[1:]], cwd=scratch, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def hub_standins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random models saved under the Hub ids the first snippet names, with its geometry (224 px, 14 px patches:
    257 vision tokens; a 12-layer bridge), so `num_image_tokens` is the README's 29."""
    from transformers import BertConfig, BertModel

    from leanvlp.tiny import save_tiny_towers

    folder = tmp_path_factory.mktemp("hub")
    vision, text = save_tiny_towers(folder / "towers", ["a red circle", "what colour is the bus ?"], image_size=224,
                                    patch_size=14, vision_hidden=32, llm_hidden=32)
    (folder / "openai").mkdir()
    (folder / "facebook").mkdir()
    (folder / "google-bert").mkdir()
    vision.rename(folder / "openai" / "clip-vit-large-patch14")
    text.rename(folder / "facebook" / "opt-2.7b")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30)).save_pretrained(folder / "google-bert" / "bert-base-uncased")
    return folder


def _images(count: int) -> list:
    from leanvlp.data import make_shapes_dataset
    from leanvlp.data.pairs import decode_image

    data = make_shapes_dataset(count, image_size=64)
    return [decode_image(r["image"], r["image_id"]) for r in data]


@pytest.mark.slow
def test_readme_merge_bridge_snippet_runs_with_tiny_standins(hub_standins: Path, capsys, monkeypatch):
    snippet = next(s for s in python_snippets() if "from_vision_text_pretrained" in s)
    monkeypatch.chdir(hub_standins)
    images = _images(2)
    exec(compile(snippet, "README.md", "exec"), {"image": images[0], "images": images,
                                                 "captions": ["a red circle", "a blue square"]})
    assert "29" in capsys.readouterr().out.split()  # the comment's 257 -> 29 visual tokens
    assert (hub_standins / "my-model" / "config.json").is_file()


@pytest.mark.slow
def test_readme_token_merging_snippet_runs_with_a_tiny_dinov2(tmp_path: Path, monkeypatch):
    from transformers import AutoImageProcessor, Dinov2Config, Dinov2Model  # noqa: F401

    snippet = next(s for s in python_snippets() if "TokenMergingVisionTower(" in s)
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=224, patch_size=14)).save_pretrained(tmp_path / "dinov2")
    monkeypatch.chdir(tmp_path)
    image = _images(1)[0].resize((224, 224))
    pixels = torch.randn(1, 3, 224, 224)
    scope = {"path": str(tmp_path / "dinov2"), "pixel_values": pixels, "image": image}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["out"].last_hidden_state.shape == (1, 257 - 2 * 16, 32)
    assert (tmp_path / "merged.png").is_file()


def test_readme_patch_align_snippet(capsys):
    snippet = next(s for s in python_snippets() if "PatchAlignConfig(" in s)
    if "..." in snippet:  # placeholders for the towers' configs and the other heads
        reason = ("its configs are '...' placeholders; tests/test_patch_align.py builds the same model from tiny "
                  "configs")
        with capsys.disabled():
            print(f"\nREADME PatchAlign snippet not run: {reason}")
        pytest.skip(reason)
    exec(compile(snippet, "README.md", "exec"), {})
