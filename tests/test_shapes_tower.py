"""The embedded shapes tower: its pretraining targets, its recipe's reproducibility, what it has learned, and how
train.py starts the main job's MergeBridge from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, ViTModel

from leanvlp.data.shapes import COLOURS, SHAPES, make_shapes_dataset, make_shapes_held_out
from leanvlp.training.arguments import parse_args
from leanvlp.training.models import build_merge_bridge
from leanvlp.training.shapes_tower import RECIPE, SHAPES_TOWER_DIR, presence_f1, pretrain, shapes_targets


def test_targets_follow_the_boxes():
    row = make_shapes_dataset(1)[0]
    targets = shapes_targets([row], 64, 8, min_cover=0.25)
    assert targets["pixels"].shape == (1, 3, 64, 64) and -1 <= targets["pixels"].min() < targets["pixels"].max() <= 1
    present = {SHAPES[i] for i in range(len(SHAPES)) if targets["presence"][0, i]}
    colours = {list(COLOURS)[i] for i in range(len(COLOURS)) if targets["presence"][0, len(SHAPES) + i]}
    assert present == set(row["box_labels"]) and colours == {a[0] for a in row["box_attributes"]}
    labels = targets["patch_classes"][0].reshape(8, 8)
    for (x, y, w, h), shape in zip(row["boxes"], row["box_labels"]):  # the patch at each box's centre is its shape
        assert labels[int((y + h / 2) // 8), int((x + w / 2) // 8)] == SHAPES.index(shape)
    covered = np.zeros((8, 8), dtype=bool)
    for x, y, w, h in row["boxes"]:
        covered[int(y) // 8:int(np.ceil((y + h) / 8)), int(x) // 8:int(np.ceil((x + w) / 8))] = True
    assert (labels[torch.from_numpy(~covered)] == len(SHAPES)).all()  # patches no box touches: background


def test_presence_f1_by_hand():
    predicted = torch.zeros(2, len(SHAPES) + len(COLOURS), dtype=torch.bool)
    present = predicted.clone()
    predicted[0, [0, 1]] = True  # circle (right), square (wrong)
    present[0, 0] = present[1, 2] = True  # circle; triangle (missed)
    predicted[:, len(SHAPES)] = present[:, len(SHAPES)] = True  # red in both: colour F1 1
    assert presence_f1(predicted, present) == {"shape_f1": 2 * 1 / (2 + 2), "colour_f1": 1.0}


def test_the_recipe_is_reproducible(tmp_path):
    recipe = {**RECIPE, "steps": 3, "num_images": 64, "hidden_size": 32, "layers": 1, "heads": 2, "warmup": 2}
    records = [pretrain(tmp_path / name, recipe, num_eval_images=16, progress=False) for name in ("a", "b")]
    weights = [AutoModel.from_pretrained(tmp_path / name).state_dict() for name in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # same seed, same bits
    assert records[0]["held_out"] == records[1]["held_out"]
    assert json.loads((tmp_path / "a" / "pretraining.json").read_text())["recipe"] == recipe


def _probe_shape_f1(tower: ViTModel) -> float:
    """A ridge-regression probe on max-pooled patch tokens: fitted on 400 training images, scored on 200 held-out."""
    def features(rows):
        targets = shapes_targets(rows, 64, 8, 0.25)
        with torch.no_grad():
            pooled = tower(pixel_values=targets["pixels"]).last_hidden_state[:, 1:].max(1).values
        return torch.cat([pooled, torch.ones(len(pooled), 1)], 1).double(), targets["presence"].double()

    x, y = features(make_shapes_dataset(400, start_index=50_000))
    x_test, y_test = features(make_shapes_held_out(200))
    weights = torch.linalg.solve(x.T @ x + 1e-2 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    return presence_f1((x_test @ weights) > 0.5, y_test > 0.5)["shape_f1"]


@pytest.mark.slow
def test_the_embedded_tower_tells_shapes_apart():
    """What the pretraining bought: a linear probe reads the shapes off the embedded tower far better than off a
    random tower of the same config (the probe sees neither tower's training)."""
    record = json.loads((SHAPES_TOWER_DIR / "pretraining.json").read_text())
    assert record["recipe"] == RECIPE and record["held_out"]["shape_f1"] >= 0.8
    pretrained = AutoModel.from_pretrained(SHAPES_TOWER_DIR).eval()
    torch.manual_seed(0)
    random = AutoModel.from_config(pretrained.config).eval()
    trained_f1, random_f1 = _probe_shape_f1(pretrained), _probe_shape_f1(random)
    assert trained_f1 >= 0.7 and trained_f1 >= random_f1 + 0.2, (trained_f1, random_f1)


def test_train_py_starts_the_main_job_from_the_embedded_tower():
    model_args, _, _ = parse_args(["--output_dir", "unused"])
    assert model_args.tiny_vision_init == "shapes" and model_args.freeze_vision is True
    model, processor = build_merge_bridge(model_args, ["a red circle", "two objects"])
    embedded = AutoModel.from_pretrained(SHAPES_TOWER_DIR).state_dict()
    tower = model.model.vision_tower.vision_model.state_dict()
    assert tower.keys() == embedded.keys() and all(torch.equal(tower[k], embedded[k]) for k in tower)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert processor.image_processor.size == {"height": 64, "width": 64}
    random_args, _, _ = parse_args(["--output_dir", "unused", "--tiny_vision_init", "random"])
    assert random_args.freeze_vision is False
    fresh, _ = build_merge_bridge(random_args, ["a red circle"])
    assert fresh.config.vision_config.hidden_size == random_args.tiny_vision_hidden
    patch_args, _, _ = parse_args(["--output_dir", "unused", "--family", "patch_align", "--task", "pretrain"])
    sized_args, _, _ = parse_args(["--output_dir", "unused", "--tiny_vision_hidden", "32"])  # a size: a new ViT
    assert patch_args.tiny_vision_init == sized_args.tiny_vision_init == "random"


@pytest.mark.slow
def test_the_main_job_trains_from_the_embedded_tower_and_leaves_it_unchanged(tmp_path):
    """train.py's default path for a few steps: the saved model's tower is still the embedded one (frozen), and
    the model card names it."""
    from leanvlp.training import main

    out = tmp_path / "run"
    assert main(["--num_train_images", "24", "--num_eval_images", "4", "--max_steps", "2", "--logging_steps", "1",
                 "--per_device_train_batch_size", "8", "--save_strategy", "no", "--max_new_tokens", "3",
                 "--tiny_llm_hidden", "32", "--bridge_hidden", "32", "--disable_tqdm", "true",
                 "--output_dir", str(out)]) == 0
    from transformers import AutoModelForImageTextToText

    saved = AutoModelForImageTextToText.from_pretrained(out).model.vision_tower.vision_model.state_dict()
    embedded = AutoModel.from_pretrained(SHAPES_TOWER_DIR).state_dict()
    assert all(torch.equal(saved[k], embedded[k]) for k in embedded)
    assert "vision tower: leanvlp's embedded tiny ViT" in json.loads((out / "training_summary.json").read_text())[
        "training_data"]
    assert "a frozen vision tower" in (out / "README.md").read_text().lower()
