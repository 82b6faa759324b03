"""benchmarks/text_guided_merging.py end to end on a tiny config: JSON per run, resume, same seed same numbers, the
cached-feature path equal to MergeBridge.forward, paired initial weights, the report, plot, merge map and cost."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("text_guided_merging", ROOT / "benchmarks" / "text_guided_merging.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

# 56 px / 14 px patches: 16 patches + CLS = 17 tokens; r = [4, 4] gives 17 -> 13 -> 9, which leaves room to guard 2.
TINY = dict(bench.SETTINGS, vision="tiny", image_size=56, bridge_hidden=32, bridge_layers=2, bridge_heads=2,
            llm_hidden=32, llm_layers=1, llm_heads=2, guard=2, batch_size=4, steps=3, eval_every=2, train_images=6,
            test_images=5, arms={"unmerged": [0, 0], "plain 9": [4, 4], "guided 9": [4, 4]}, map_arm="guided 9")
ARMS = list(TINY["arms"])
TIMING = {"train_cpu_seconds", "eval_cpu_seconds"}


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guided")
    torch.set_num_threads(1)
    runs = bench.run_all(TINY, ARMS, [0], tmp / "runs", tmp / "cache", tmp / "report.md", tmp / "plot.png",
                         tmp / "map.png", cost_repeats=1)
    return tmp, runs


def test_runs_write_one_json_each_with_the_configured_token_counts(finished):
    tmp, runs = finished
    assert sorted(p.name for p in (tmp / "runs").glob("*_seed0.json")) == [
        "guided_9_seed0.json", "plain_9_seed0.json", "unmerged_seed0.json"]
    assert {arm: runs[arm][0]["num_image_tokens"] for arm in ARMS} == {"unmerged": 17, "plain 9": 9, "guided 9": 9}
    assert runs["guided 9"][0]["token_counts"] == [13, 9]
    for arm in ARMS:
        record = runs[arm][0]
        assert [p["step"] for p in record["curve"]] == [0, 2, 3]
        assert len(record["final_correct"]) == TINY["test_images"]
        assert record["final_accuracy"] == sum(record["final_correct"]) / TINY["test_images"]
        library, cached = record["check_loss"]  # the cached-feature path's loss is the library forward's
        assert abs(library - cached) <= 1e-5


def test_resume_skips_and_same_seed_gives_the_same_numbers(finished, capsys):
    tmp, runs = finished
    before = {p.name: p.read_text() for p in (tmp / "runs").glob("*.json")}
    bench.run_all(TINY, ARMS, [0], tmp / "runs", tmp / "cache", cost_repeats=0)
    assert "skip guided 9 seed 0" in capsys.readouterr().out
    assert {p.name: p.read_text() for p in (tmp / "runs").glob("*.json")} == before
    again = bench.run_all(TINY, ["guided 9"], [0], tmp / "again", tmp / "cache", cost_repeats=0)
    assert without_timing(again["guided 9"][0]) == without_timing(runs["guided 9"][0])
    with pytest.raises(SystemExit, match="other settings"):
        bench.run_all(dict(TINY, steps=4), ["guided 9"], [0], tmp / "again", tmp / "cache", cost_repeats=0)


def test_every_arm_of_a_seed_starts_from_the_same_weights():
    vision, tokenizer = bench.load_vision(TINY), bench.build_tokenizer()
    plain = bench.build(TINY, vision, tokenizer, "plain 9", 1).state_dict()
    for arm in ("unmerged", "guided 9"):
        other = bench.build(TINY, vision, tokenizer, arm, 1).state_dict()
        assert other.keys() == plain.keys() and all(torch.equal(other[k], plain[k]) for k in plain)
    assert not torch.equal(bench.build(TINY, vision, tokenizer, "plain 9", 2).state_dict()["lm_head.weight"],
                           plain["lm_head.weight"])


def test_report_plot_map_and_cost(finished):
    tmp, _ = finished
    text = (tmp / "report.md").read_text()
    assert text.startswith(bench.BEGIN) and text.rstrip().endswith(bench.END)
    assert "| guided 9 | 9 | 1 |" in text and "| unmerged | 17 | 1 |" in text
    assert "guided 9 - plain 9 | 1 |" in text and "inconclusive (fewer than 2 paired seeds)" in text
    blind = json.loads((tmp / "runs" / "blind.json").read_text())
    assert blind["chance"] == 1 / 8 and 0 <= blind["prior"] <= 1
    cost = json.loads((tmp / "runs" / "cost.json").read_text())
    assert set(cost) == {"9 cached", "9 pixels"} and all(c["ratio"][0] > 0 for c in cost.values())
    assert (tmp / "plot.png").stat().st_size > 0 and (tmp / "map.png").stat().st_size > 0
    # The report is rewritten in place between its markers; text around them stays.
    (tmp / "report.md").write_text("intro\n\n" + text + "\noutro\n")
    bench.write_report(tmp / "runs", tmp / "report.md", tmp / "plot.png")
    assert (tmp / "report.md").read_text() == "intro\n\n" + text + "\noutro\n"


def test_asked_patches_are_the_patches_the_asked_box_overlaps():
    split = {"questions": ["what color is the star?"], "objects": [[("circle", "red"), ("star", "blue")]],
             "boxes": [[[0.0, 0.0, 5.0, 5.0], [10.0, 10.0, 10.0, 10.0]]]}
    assert bench.asked_patches(split, 0, grid=4, image_size=56) == {0, 1, 4, 5}  # 14 px patches: x, y in 10..19
    split["boxes"][0][1] = [14.0, 0.0, 14.0, 14.0]
    assert bench.asked_patches(split, 0, grid=4, image_size=56) == {1}  # exactly one patch, edges exclusive


def test_guard_study_reproduces_the_run_and_reports_where_the_guard_looks(finished):
    tmp, _ = finished
    guard = bench.guard_study(TINY, tmp / "runs", tmp / "cache", tmp / "guard_map.png")
    assert set(guard) == {"guided 9"}
    stats = guard["guided 9"]
    assert stats["images"] == TINY["test_images"] and 0 <= stats["hit_rate"] <= 1 and 0 < stats["chance"] < 1
    assert 0 < stats["mean_guarded"] <= TINY["guard"]
    assert (tmp / "guard_map.png").stat().st_size > 0
    bench.write_report(tmp / "runs", tmp / "report2.md", tmp / "plot2.png")
    assert "Where the guidance looks" in (tmp / "report2.md").read_text()
