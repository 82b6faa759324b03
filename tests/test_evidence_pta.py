"""Experiment (b)'s script (benchmarks/evidence/pta_keep.py) end to end on a tiny config: one JSON per run, resume,
same seed same numbers, its report section placed after experiment (a)'s; and its AUROC helper by hand."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "evidence"))
import pta_keep  # noqa: E402

from leanvlp.data.shapes import COLOURS, SHAPES  # noqa: E402

TINY = dict(pta_keep.SETTINGS, image_size=32, vision_hidden=32, vision_layers=2, text_hidden=32, text_layers=1,
            embed_dim=16, detector_layer=1, batch_size=8, steps=4, eval_every=2, vqa_steps=2, train_images=24,
            eval_images=12)
TIMING = ("train_seconds", "train_cpu_seconds", "eval_seconds", "eval_cpu_seconds", "vqa_train_cpu_seconds",
          "train_runtime", "train_samples_per_second", "train_steps_per_second")


def untimed(value):
    """The record without its timing fields (they differ between two runs of the same seed)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return pta_keep.prepare(dict(TINY))


def test_auroc_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.4, 0.6, 0.8]])
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]])
    # row 0: positives {0.9, 0.5} vs negatives {0.1, 0.5}: wins 1 + 1 + 1 + a tie (0.5) = 3.5 of 4 pairs
    got = pta_keep.auroc(scores, labels)
    assert got[0].item() == 3.5 / 4 and torch.isnan(got[1])  # row 1 has no positive
    # against chosen negatives only (the distractors): 0.9 and 0.5 vs 0.1 -> both win
    assert pta_keep.auroc(scores, labels, torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0]]))[0].item() == 1.0


def test_eval_items_name_one_object_and_its_patches(data):
    _, items = data
    grid = (TINY["image_size"] // TINY["patch_size"]) ** 2
    assert len(items["masked"]) == TINY["eval_images"] and items["labels"].shape == (TINY["eval_images"], grid)
    for text, target, kind in zip(items["masked"], items["targets"], items["kinds"]):
        assert text.startswith("there is a ") and text.count("[MASK]") == 1
        assert (text.endswith("[MASK]") and kind == "shape") or (kind == "colour" and " [MASK] " in text)
        assert target in (SHAPES if kind == "shape" else COLOURS)
    assert (items["labels"].sum(1) > 0).all() and not (items["labels"] * items["distractors"]).any()
    assert all(q.startswith(("what color", "what shape")) for q in items["vqa_questions"])


def test_runs_write_json_resume_and_repeat_exactly(data, tmp_path, capsys):
    train, items = data
    s = dict(TINY)
    pta_keep.run_all(["keep1.0", "random"], [0], s, train, items, runs_dir=tmp_path)
    records = pta_keep.load_runs(tmp_path)
    assert set(records) == {"keep1.0", "random"}
    for record in (records["keep1.0"][0], records["random"][0]):
        assert [p["step"] for p in record["curve"]] == [0, 2, 4]
        for point in record["curve"]:
            assert all(0.0 <= point[m] <= 1.0 for m in pta_keep.METRICS)
        assert 0.0 <= record["vqa_acc"] <= 1.0 and record["vqa_items"] == len(items["vqa_questions"])
    # keep 1.0: the text-aware tokens are the text-agnostic ones (nothing is pruned); random keep 0.5: they differ
    assert records["keep1.0"][0]["curve"][-1]["aware_differs"] == 0.0
    assert records["random"][0]["curve"][-1]["aware_differs"] == 1.0

    before = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    pta_keep.run_all(["keep1.0", "random"], [0], s, train, items, runs_dir=tmp_path)  # resume: both skipped
    assert "skip keep1.0 seed 0" in capsys.readouterr().out
    assert {p.name: p.read_text() for p in tmp_path.glob("*.json")} == before

    # same seed, same numbers (random selection included: it draws from the seeded global generator)
    again = pta_keep.run("random", 0, s, train, items)
    assert untimed(json.loads(json.dumps(again))) == untimed(records["random"][0])

    with pytest.raises(SystemExit, match="other settings"):
        pta_keep.run_all(["random"], [0], {**s, "steps": 5}, train, items, runs_dir=tmp_path)


def test_report_section_goes_after_experiment_a_and_is_replaced(data, tmp_path):
    train, items = data
    s = dict(TINY)
    runs_dir = tmp_path / "runs"
    for seed in (0, 1):
        pta_keep.run_all(["keep1.0", "detector_pta"], [seed], s, train, items, runs_dir=runs_dir)
    report = tmp_path / "evidence.md"
    report.write_text("# title\n\n<!-- experiment a: begin -->\nA\n<!-- experiment a: end -->\n\nlater text\n")
    runs = pta_keep.load_runs(runs_dir)
    for _ in range(2):  # the second write replaces the section
        pta_keep.write_report(runs, pta_keep.blind_baselines(items), report_path=report, plot_path=None)
    text = report.read_text()
    assert text.count(pta_keep.BEGIN) == 1 and text.count(pta_keep.END) == 1
    assert text.index("<!-- experiment a: end -->") < text.index(pta_keep.BEGIN) < text.index("later text")
    assert "| MLM | detector_pta − keep1.0 | 2 |" in text and "non-inferior to no pruning (margin 0.02)" in text
