"""benchmarks/evidence/bridges.py (issue #15 experiment c) end to end on tiny random towers: every arm trains and is
evaluated, runs are written as JSON and resumed, the same seed gives the same numbers, and the cached-prefix answer
ranking equals a plain forward of each whole prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from transformers import BertConfig, BertModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "evidence"))

import bridges  # noqa: E402

from leanvlp.tiny import save_tiny_towers  # noqa: E402

COLOURS = ["red", "green", "blue", "teal"]
QUESTIONS = ["what color is the shape?", "is there a red shape?", "what shape is in the image?",
             "does the image not contain a blue shape?"]
SETTINGS = dict(bridges.SETTINGS, image_size=56, bridge_layers=3, num_queries=4, batch_size=2, steps=2, lr=1e-3,
                warmup=1, eval_images=3, questions_per_image=2, eval_batch_size=4, eval_every=0, eval_at_start=True,
                cost_ratio={"r16": 2.0})
TIMING = ("train_cpu_seconds", "train_seconds", "cpu_seconds_per_step", "eval_cpu_seconds")


def rows(count: int, offset: int) -> list[dict]:
    """Solid-colour images with easy-vqa-shaped questions; answers follow the colour."""
    out = []
    for i in range(count):
        colour = COLOURS[(i + offset) % len(COLOURS)]
        rgb = {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200), "teal": (0, 128, 128)}[colour]
        answers = [colour, "yes" if colour == "red" else "no", "circle", "yes" if colour != "blue" else "no"]
        out.append({"image": PIL.Image.new("RGB", (40, 40), rgb), "questions": QUESTIONS,
                    "answers": [[a] * 10 for a in answers]})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, torch.nn.Module, bridges.Data]:
    out = tmp_path_factory.mktemp("bridges")
    texts = QUESTIONS + list(bridges.ANSWERS) + ["Question: x Short answer:"]
    vision, text = save_tiny_towers(out, texts, image_size=56, patch_size=14, vision_hidden=32, llm_hidden=32)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(out / "bert")
    dirs = {"vision": vision, "llm": text, "minilm": out / "bert"}
    s = dict(SETTINGS)
    model = bridges.merge_bridge_model(s, 0, 0, dirs)
    llm = bridges.frozen_llm(dirs["llm"], model)
    processor = bridges.MergeBridgeProcessor.from_vision_text_pretrained(
        str(vision), str(text), num_image_tokens=model.config.num_image_tokens)
    train, test = rows(6, 0), rows(3, 1)
    train_feats, _ = bridges.vision_features(model, processor, [r["image"] for r in train])
    test_feats, _ = bridges.vision_features(model, processor, [r["image"] for r in test])
    return s, dirs, llm, bridges.make_data(s, train, test, train_feats, test_feats)


def test_runs_resume_and_repeat(setup: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s, dirs, llm, data = setup
    jobs = [(arm, 0, s, tmp_path / "a") for arm in bridges.ARMS]
    bridges.run_all(jobs, data, dirs, llm)
    runs = bridges.load_runs(tmp_path / "a")
    assert sorted(runs) == sorted(bridges.ARMS)
    r16 = runs["r16"][0]
    assert r16["steps"] == 4 and [p["step"] for p in r16["curve"]] == [0, 2, 4]  # equal steps, equal CPU time
    assert [p["step"] for p in runs["r0"][0]["curve"]] == [0, 2]
    assert len(r16["losses"]) == 4 and 0.0 <= r16["shuffled_accuracy"] <= 1.0
    assert {runs[a][0]["visual_tokens"] for a in ("r0", "r8", "qformer")} == {17, 3, 4}  # 17 -> 9 -> 5 -> 3
    assert runs["r0"][0]["llm_tokens_per_sample"] > runs["r8"][0]["llm_tokens_per_sample"]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run must be skipped")

    monkeypatch.setattr(bridges, "run", refuse)
    bridges.run_all(jobs, data, dirs, llm)  # resumes: nothing left to run
    monkeypatch.undo()
    bridges.run_all([("r16", 0, s, tmp_path / "b")], data, dirs, llm)
    again = json.loads((tmp_path / "b" / "r16_seed0.json").read_text())

    def strip(record: dict) -> dict:
        record = {k: v for k, v in record.items() if k not in TIMING}
        record["curve"] = [{k: v for k, v in p.items() if k not in TIMING} for p in record["curve"]]
        return record

    assert strip(again) == strip(r16)
    with pytest.raises(SystemExit, match="other settings"):
        bridges.run_all([("r16", 0, {**s, "lr": 2e-3}, tmp_path / "b")], data, dirs, llm)


@pytest.mark.parametrize("name", list(bridges.ARMS))
def test_cached_ranking_equals_plain_forward(setup: tuple, name: str) -> None:
    s, dirs, llm, data = setup
    arm = bridges.build_arm(name, s, 1, dirs, llm)
    with torch.no_grad():  # a trained-looking bridge: random outputs of a useful scale
        for p in arm.lm.params:
            p.add_(torch.randn_like(p) * 0.5)
    bridges.check_ranking(arm, data)  # raises on a mismatch beyond 1e-3 or when the images are not read
    normal, shuffled = bridges.answer_scores(arm, data, [list(range(3)), data.shuffle], batch_size=5)
    full = bridges.full_answer_scores(arm, data, list(range(len(data.eval_qa))))
    torch.testing.assert_close(normal, full, atol=1e-4, rtol=0)
    assert not torch.allclose(normal, shuffled)


def test_controls_and_helpers(setup: tuple) -> None:
    _, _, _, data = setup
    assert [bridges.question_type(q) for q in QUESTIONS] == ["colour", "yes/no", "shape", "yes/no"]
    with pytest.raises(ValueError, match="question_type"):
        bridges.question_type("how many shapes?")
    perm = bridges.derangement(7, 3)
    assert sorted(perm) == list(range(7)) and all(perm[i] != i for i in range(7))
    # training majorities: colour red (ties with green, seen first), yes/no "yes" 7 of 12, shape circle
    controls = bridges.blind_controls(data)
    assert controls["type_answers"] == {"colour": "red", "shape": "circle", "yes/no": "yes"}
    by_text = dict(zip(QUESTIONS, ["red", "no", "circle", "yes"]))
    n = len(data.eval_qa)
    assert controls["type_majority"] == sum(a == controls["type_answers"][bridges.question_type(q)]
                                            for _, q, a in data.eval_qa) / n
    assert controls["text_majority"] == sum(a == by_text[q] for _, q, a in data.eval_qa) / n
    assert len(data.eval_qa) == 6 and {i for i, _, _ in data.eval_qa} == {0, 1, 2}


def test_report_from_runs(setup: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s, dirs, llm, data = setup
    for seed in (0, 1):
        bridges.run_all([(arm, seed, s, tmp_path / "runs") for arm in bridges.ARMS], data, dirs, llm)
    monkeypatch.setattr(bridges, "REPORT", tmp_path / "evidence.md")
    monkeypatch.setattr(bridges, "PLOT", tmp_path / "c.png")
    (tmp_path / "evidence.md").write_text(f"# x\n\nbefore\n\n{bridges.BEGIN}\nSTALE-SECTION\n{bridges.END}\n\nafter\n")
    bridges.write_report(bridges.load_runs(tmp_path / "runs"), {})
    text = (tmp_path / "evidence.md").read_text()
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "STALE-SECTION" not in text
    assert "| MergeBridge r=16 | 2 |" in text and "### Verdicts" in text and (tmp_path / "c.png").exists()
