"""leanvlp.model_card: cards build from a saved folder, reload with ModelCard.load, round-trip their
metadata (model-index == eval_results.json), regenerate from the CLI, and fail clearly on bad input."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import ModelCard

from leanvlp.metrics import caption_metrics, retrieval_recall, vqa_accuracy
from leanvlp.model_card import build_model_card, main, parse_eval_results, push_to_hub, write_model_card

BASE_MODELS = ["google/siglip-base-patch16-224", "HuggingFaceTB/SmolLM2-135M-Instruct"]


def eval_results() -> dict:
    """eval_results.json content with real numbers from leanvlp.metrics (unrounded floats)."""
    preds = ["a red circle on the left", "a blue square", "a green star at the top"]
    refs = [["a red circle on the left"], ["a big blue square"], ["a green star at the top", "green star"]]
    sim = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.35], [0.1, 0.4, 0.3]])
    vqa = vqa_accuracy(["Two", "yes"], [["2"] * 3 + ["3"] * 7, ["yes"]])
    speed_rows = [
        {"setting": "merging off", "visual tokens": 257, "images/s": 410.5},
        {"setting": "merging on (r=19)", "visual tokens": 29, "images/s": 792.25},
    ]
    return {
        "results": [
            {"task": "caption", "dataset": "shapes", "split": "test", "metrics": caption_metrics(preds, refs)},
            {"task": "vqa", "dataset": "easy-vqa", "dataset_name": "easy-VQA", "split": "test",
             "metrics": {"vqa_accuracy": vqa}},
            {"task": "retrieval", "dataset": "shapes", "split": "test", "metrics": retrieval_recall(sim)},
            {"task": "speed", "dataset": "shapes", "metrics": {"speedup": 1.93}, "rows": speed_rows},
        ]
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A saved-model folder as eval and train leave it (weights are irrelevant to the card)."""
    d = tmp_path / "shapes-merge-bridge"
    d.mkdir()
    config = {"model_type": "merge_bridge", "architectures": ["MergeBridgeForConditionalGeneration"]}
    (d / "config.json").write_text(json.dumps(config))
    (d / "eval_results.json").write_text(json.dumps(eval_results()))
    summary = {"base_models": BASE_MODELS, "datasets": ["shapes"], "max_steps": 300}
    summary |= {"optimizer": {"lr": 1e-4, "weight_decay": 0.05}, "merging": "r=19 x 12, mean"}
    (d / "training_summary.json").write_text(json.dumps(summary))
    return d


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def model_index(card: ModelCard) -> dict[tuple, object]:
    return {
        (r.task_type, r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results
    }


def test_card_round_trips_metadata_and_model_index(model_dir: Path):
    path = write_model_card(model_dir, family="merge_bridge", base_models=BASE_MODELS, datasets=["shapes"])
    assert path == model_dir / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-text-to-text"
    assert data.base_model == BASE_MODELS and data.datasets == ["shapes"]
    assert {"leanvlp", "vision-language", "token-merging"} <= set(data.tags)
    assert data.metrics == ["bleu", "cider", "rouge", "accuracy", "recall"]

    # every quality number in eval_results.json appears unrounded in model-index, and nothing else does
    task_types = {"caption": "image-to-text", "vqa": "visual-question-answering", "retrieval": "image-text-retrieval"}
    expected = {
        (task_types[e["task"]], e["dataset"], e["split"], name): value
        for e in json.loads((model_dir / "eval_results.json").read_text())["results"]
        if e["task"] != "speed"
        for name, value in e["metrics"].items()
    }
    assert len(expected) == 6 + 1 + 7
    assert model_index(card) == expected
    names = {r.dataset_type: r.dataset_name for r in data.eval_results}
    assert names == {"shapes": "shapes", "easy-vqa": "easy-VQA"}

    text = card.text
    for section in ("## Usage", "## Training", "## Evaluation", "## Speed", "## Limitations", "## Citation"):
        assert section in text
    assert "| merging on (r=19) | 29 | 792.2 |" in text  # speed table from the speed entry's rows
    assert "| optimizer | lr=0.0001, weight_decay=0.05 |" in text  # a nested mapping in one cell
    assert "| Image captioning | shapes | test | CIDEr-D |" in text
    assert "Token Merging: Your {ViT} but Faster" in text and "2310.03291" in text
    assert f'model_id = "{model_dir}"' in text  # default usage snippet points at the folder
    assert "MergeBridgeForConditionalGeneration" in text


def test_explicit_arguments_override_the_folder_files(model_dir: Path):
    entries = [{"task": "caption", "dataset": "coco", "split": "karpathy-test", "metrics": {"cider": 1.234}}]
    card = build_model_card(
        model_dir,
        family="merge_bridge",
        base_models=BASE_MODELS,
        datasets=["coco"],
        eval_results=entries,  # a bare list is accepted too
        speed_table=[{"r": 0, "ms/step": 12.5}, {"r": 19, "ms/step": 6.25}],
        training_summary={"epochs": 3},
        usage_snippet="print('custom snippet')",
        model_id="leanvlp/shapes-mb",
        tags=["shapes"],
    )
    assert model_index(card) == {("image-to-text", "coco", "karpathy-test", "cider"): 1.234}
    assert card.data.model_name == "shapes-mb" and "shapes" in card.data.tags
    assert "print('custom snippet')" in card.text and "| 19 | 6.25 |" in card.text
    assert "| epochs | 3 |" in card.text and "max_steps" not in card.text


def test_patch_align_family_uses_its_template(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "patch_align"}))
    card = build_model_card(tmp_path, family="patch_align", base_models=[], datasets=[])
    assert "PatchAlign" in card.text and "2308.03475" in card.text and "2301.07236" in card.text
    assert "No evaluation results yet" in card.text and "No speed measurements yet" in card.text
    assert card.data.eval_results is None and card.data.base_model is None
    assert "patch-pruning" in card.data.tags


def test_cli_regenerates_the_card_from_the_folder(model_dir: Path, capsys: pytest.CaptureFixture):
    assert main([str(model_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(model_dir / "README.md")
    first = ModelCard.load(model_dir / "README.md")
    assert first.data.base_model == BASE_MODELS  # from training_summary.json
    assert len(first.data.eval_results) == 14

    # without training_summary.json, base models and datasets are kept from the existing card
    (model_dir / "training_summary.json").unlink()
    results = eval_results()
    results["results"][0]["metrics"]["cider"] = 2.5
    (model_dir / "eval_results.json").write_text(json.dumps(results))
    assert main([str(model_dir), "--model-id", "me/shapes"]) == 0
    second = ModelCard.load(model_dir / "README.md")
    assert second.data.base_model == BASE_MODELS and second.data.datasets == ["shapes"]
    assert model_index(second)[("image-to-text", "shapes", "test", "cider")] == 2.5
    assert 'model_id = "me/shapes"' in second.text

    assert main([str(model_dir), "--base-model", "x/vit", "--dataset", "y/data"]) == 0
    third = ModelCard.load(model_dir / "README.md")
    assert third.data.base_model == ["x/vit"] and third.data.datasets == ["y/data"]


@pytest.mark.slow
def test_cli_module_entry_point(model_dir: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "leanvlp.model_card", str(model_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(model_dir / "README.md")
    assert ModelCard.load(model_dir / "README.md").data.library_name == "transformers"


def test_bad_input_gives_clear_errors(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture):
    kw = {"family": "merge_bridge", "base_models": [], "datasets": []}
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_model_card(tmp_path, **kw)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_model_card(tmp_path / "nope", **kw)
    with pytest.raises(ValueError, match="unknown model family 'llava'"):
        build_model_card(model_dir, family="llava", base_models=[], datasets=[])
    with pytest.raises(ValueError, match="family 'patch_align' does not match config.json model_type 'merge_bridge'"):
        build_model_card(model_dir, family="patch_align", base_models=[], datasets=[])
    with pytest.raises(TypeError, match="base_models must be a list"):
        build_model_card(model_dir, family="merge_bridge", base_models="google/siglip", datasets=[])

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model family 'llava'" in err
    assert not (tmp_path / "README.md").exists()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"results": {}}, "must be a list of entries"),
        ([{"dataset": "shapes", "metrics": {"cider": 1.0}}], r"\['task'\] must be a non-empty string"),
        ([{"task": "detection", "dataset": "shapes", "metrics": {"map": 0.5}}], "'detection' is unknown"),
        ([{"task": "caption", "dataset": "shapes"}], r"\['metrics'\] must be a non-empty object"),
        ([{"task": "caption", "dataset": "shapes", "metrics": {"cider": "high"}}], r"\['cider'\] must be a finite"),
        ([{"task": "vqa", "dataset": "x", "metrics": {"vqa_accuracy": float("nan")}}], "must be a finite number"),
        ([{"task": "speed", "dataset": "x", "rows": "fast"}], r"\['rows'\] must be a list of objects"),
    ],
)
def test_bad_eval_results(entries, message):
    with pytest.raises(ValueError, match=message):
        parse_eval_results(entries)


def test_custom_task_with_explicit_task_type(model_dir: Path):
    entries = [{"task": "grounding", "task_type": "object-detection", "dataset": "refcoco", "metrics": {"acc": 0.5}}]
    card = build_model_card(model_dir, family="merge_bridge", base_models=[], datasets=[], eval_results=entries)
    assert model_index(card) == {("object-detection", "refcoco", None, "acc"): 0.5}


def test_push_offline_is_one_clear_error_and_leaves_the_folder_untouched(model_dir: Path):
    before = snapshot(model_dir)  # no README.md yet
    with pytest.raises(ConnectionError, match="offline") as info:
        push_to_hub(model_dir, "me/shapes-mb")
    assert "\n" not in str(info.value) and "me/shapes-mb" in str(info.value)
    assert snapshot(model_dir) == before

    write_model_card(model_dir, family="merge_bridge", base_models=BASE_MODELS, datasets=["shapes"])
    before = snapshot(model_dir)
    with pytest.raises(ConnectionError, match="offline"):
        push_to_hub(model_dir, "me/shapes-mb")
    assert snapshot(model_dir) == before


def test_push_network_error_leaves_the_folder_untouched(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    # Online mode against a local port nothing listens on: a real connection error, no Hub involved.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_model_card(model_dir, family="merge_bridge", base_models=BASE_MODELS, datasets=["shapes"])
    before = snapshot(model_dir)
    with pytest.raises(ConnectionError, match="cannot push .* ConnectError") as info:
        push_to_hub(model_dir, "me/shapes-mb", token="hf_not_a_real_token", endpoint=f"http://127.0.0.1:{port}")
    assert "\n" not in str(info.value) and "offline" not in str(info.value).lower()
    assert snapshot(model_dir) == before


def test_push_failing_upload_restores_the_previous_card(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    # A local stand-in for the Hub (nothing else can test this offline): repo creation succeeds, every upload
    # request fails, so push_to_hub has already rewritten README.md when the error comes and must restore it.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    requests: list[str] = []

    class StandIn(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            requests.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            created = self.path == "/api/repos/create"
            body = json.dumps({"url": f"http://127.0.0.1:{port}/me/shapes-mb"} if created else {"error": "nope"})
            self.send_response(200 if created else 400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        do_GET = do_POST

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (model_dir / "README.md").write_text("---\nlicense: mit\n---\n\nhand-written card\n")
        before = snapshot(model_dir)
        with pytest.raises(ConnectionError, match="cannot push") as info:
            push_to_hub(model_dir, "me/shapes-mb", token="hf_not_a_real_token", endpoint=f"http://127.0.0.1:{port}")
        assert "\n" not in str(info.value)
        assert requests[0] == "/api/repos/create" and len(requests) > 1  # got past creation into the upload
        assert snapshot(model_dir) == before
    finally:
        server.shutdown()
        server.server_close()


def _trained_folder(tmp_path: Path, name: str, config: dict, summary: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["X"], **config}))
    (folder / "training_summary.json").write_text(json.dumps(summary))
    return folder


def test_card_text_licence_and_data_follow_the_config_and_the_training_summary(tmp_path: Path):
    from leanvlp.model_card import card_kwargs_from_folder

    losses = {str(step): 5.0 - step / 1000 for step in range(25, 750, 25)}  # 29 logged losses
    summary = {"family": "merge_bridge", "task": "caption", "steps": 747, "frozen": {"vision": True, "llm": False},
               "base_models": [], "datasets": [], "license": "apache-2.0", "losses": losses,
               "training_data": "2,000 procedural shapes images (built in code, not a Hub dataset)"}
    config = {"model_type": "merge_bridge", "freeze_vision": True, "freeze_llm": False,
              "bridge_merging": {"r": 16, "mode": "mean"}}
    folder = _trained_folder(tmp_path, "scratch", config, summary)
    path = write_model_card(folder, **card_kwargs_from_folder(folder))
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0" and card.data.datasets is None  # no invented dataset id
    first = card.text.strip().splitlines()[2]
    assert first.startswith("A vision-language model that captions images,") and "question" not in first
    assert "A frozen vision tower" in card.text and "a trained causal LLM" in card.text
    assert "frozen causal LLM" not in card.text
    assert "Trained from scratch: no base model weights" in card.text
    assert "Training data: 2,000 procedural shapes images" in card.text
    rows = [line for line in card.text.splitlines() if line.startswith("| ") and "losses" in line]
    assert rows == []  # 29 logged losses become one row
    assert "| logged loss (first -> last) | 4.975 (step 25) -> 4.275 (step 725) |" in card.text
    assert "| frozen | vision=True, llm=False |" in card.text
    assert path.read_text() == write_model_card(folder, **card_kwargs_from_folder(folder)).read_text()  # stable

    base = tmp_path / "base-llm"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    summary = {**summary, "task": "vqa", "base_models": [str(base)], "license": "mit",
               "base_model_licenses": {str(base): "mit"}, "frozen": {"vision": True, "llm": True}}
    folder = _trained_folder(tmp_path, "on-base", {**config, "freeze_llm": True}, summary)
    card = ModelCard.load(write_model_card(folder, **card_kwargs_from_folder(folder)))
    assert "answers short questions about images" in card.text and "a frozen causal LLM" in card.text
    assert f"`{base}` (licence: mit)" in card.text and card.data.license == "mit"


def test_evaluations_on_different_numbers_of_images_are_separate_model_index_entries(model_dir: Path):
    entries = [{"task": "caption", "dataset": "leanvlp-shapes", "split": f"held-out[:{n}]", "num_images": n,
                "metrics": {"cider": c}} for n, c in ((100, 0.8), (8, 0.5))]
    card = build_model_card(model_dir, family="merge_bridge", base_models=[], datasets=[], eval_results=entries)
    assert model_index(card) == {("image-to-text", "leanvlp-shapes", "held-out[:100]", "cider"): 0.8,
                                 ("image-to-text", "leanvlp-shapes", "held-out[:8]", "cider"): 0.5}
