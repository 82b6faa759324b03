"""eval.py on PatchAlign: all four tasks on a tiny checkpoint trained by train.py, results equal to the card's
model-index, the detector's keep ratio as the speed knob (1.0 = no pruning), retrieval scores equal to the
retrieval head's own, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

import leanvlp  # noqa: F401  (registers the Auto classes)
from leanvlp.evaluation import EvalArguments, count_flops, load_evaluator, main, patch_align_retrieval_scores

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--config", str(ROOT / "configs/tiny_patch_align.yaml"), "--num_train_images", "24", "--num_eval_images",
         "4", "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8", "--save_strategy",
         "no", "--tiny_image_size", "32", "--tiny_llm_hidden", "32", "--tiny_vision_hidden", "32",
         "--disable_tqdm", "true"]
SMALL = ["--num_images", "4", "--batch_size", "4", "--max_new_tokens", "3", "--warmup", "1", "--repeats", "1",
         "--progress", "false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny PatchAlign (32 px, 8 px patches: 16 patches, detector keeps 8 after block 2) trained 2 steps."""
    from leanvlp.training import main as train

    out = tmp_path_factory.mktemp("pa_eval") / "ckpt"
    assert train([*TRAIN, "--output_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def evaluated(checkpoint: Path) -> Path:
    folder = checkpoint.parent / "evaluated"
    shutil.copytree(checkpoint, folder)
    for task in ("caption", "vqa", "retrieval"):
        assert main(["--model", str(folder), "--task", task, *SMALL]) == 0
    assert main(["--model", str(folder), "--task", "speed", "--sweep", "1.0,0.5,0.25", *SMALL]) == 0
    return folder


def entries(folder: Path) -> dict[tuple, dict]:
    results = json.loads((folder / "eval_results.json").read_text())["results"]
    keyed = {(e["task"], e.get("kind")): e for e in results}
    assert len(keyed) == len(results)
    return keyed


@pytest.mark.slow
def test_every_task_writes_results_that_equal_the_cards_model_index(evaluated: Path):
    results = entries(evaluated)
    assert set(results) == {("caption", None), ("vqa", None), ("retrieval", None), ("speed", None),
                            ("speed", "sweep")}  # train.py's retrieval entry was replaced, not duplicated
    assert set(results["caption", None]["metrics"]) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "rouge_l",
                                                        "token_accuracy", "object_precision", "object_recall",
                                                        "object_f1"}
    assert set(results["vqa", None]["metrics"]) == {"vqa_accuracy", "token_accuracy"}
    assert results["vqa", None]["num_questions"] > 4
    retrieval = results["retrieval", None]
    assert set(retrieval["metrics"]) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | \
        {"r_mean", "pta_precision"}
    assert retrieval["method"].startswith("ITC similarity for all pairs, ITM re-ranking")
    assert retrieval["num_images"] == 4 and retrieval["num_texts"] > 4

    card = ModelCard.load(evaluated / "README.md")
    index = {(r.task_type, r.dataset_type, r.dataset_split, r.metric_type): r.metric_value
             for r in card.data.eval_results}
    hub_task = {"caption": "image-to-text", "vqa": "visual-question-answering", "retrieval": "image-text-retrieval"}
    expected = {(hub_task[t], e["dataset"], e["split"], name): value
                for (t, _), e in results.items() if t != "speed" for name, value in e["metrics"].items()}
    assert index == expected
    assert "detector on (keep_ratio=0.5)" in card.text and "sweep keep_ratio=0.25" in card.text
    assert (evaluated / "speed_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_speed_tokens_and_flops_follow_the_keep_ratio(evaluated: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(evaluated)
    P = config.num_patches
    assert P == 16 and config.num_kept_patches == 8
    speed = entries(evaluated)["speed", None]
    off, on = speed["settings"]
    assert (off["keep_ratio"], on["keep_ratio"]) == (1.0, 0.5)
    assert off["tokens"] == off["derived_tokens"] == {"vision_in": 17, "after_detector": 17, "llm_prefix": 17}
    assert on["tokens"] == on["derived_tokens"] == {"vision_in": 17, "after_detector": 10, "llm_prefix": 10}
    assert on["encode_flops"] < off["encode_flops"] and on["forward_flops"] < off["forward_flops"]
    assert speed["metrics"]["flops_reduction_forward"] == off["forward_flops"] / on["forward_flops"] > 1
    assert all(s["peak_memory_bytes"] > 0 and s["generate_images_per_s"] > 0 for s in (off, on))
    sweep = {p["keep_ratio"]: p for p in entries(evaluated)["speed", "sweep"]["sweep"]}
    assert [sweep[k]["tokens"]["llm_prefix"] for k in (1.0, 0.5, 0.25)] == [17, 10, 6]  # 1 + K (+1 fused)
    assert sweep[1.0]["forward_flops"] == off["forward_flops"] and sweep[0.5]["forward_flops"] == on["forward_flops"]
    assert sweep[1.0]["encode_flops"] > sweep[0.5]["encode_flops"] > sweep[0.25]["encode_flops"]
    assert math.isclose(sweep[0.5]["cider"], entries(evaluated)["caption", None]["metrics"]["cider"], abs_tol=1e-12)


@pytest.mark.slow
def test_keep_ratio_one_is_the_detector_off_and_retrieval_scores_match_the_retrieval_head(checkpoint: Path):
    from PIL import Image

    ev = load_evaluator(checkpoint, "speed")
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    texts = ["a red circle", "a green square", "a blue star", "two red circles"]
    batch = ev.batch(images, texts[:3])
    with ev.setting(1.0), torch.no_grad():
        full = ev.encode(batch)
        full_flops = count_flops(lambda: ev.encode(batch))
    ev.model.config.patch_detector["enabled"] = False
    try:
        with torch.no_grad():
            torch.testing.assert_close(ev.encode(batch), full, rtol=0, atol=0)
            assert count_flops(lambda: ev.encode(batch)) == full_flops
    finally:
        ev.model.config.patch_detector["enabled"] = True

    model = ev._load("retrieval")
    inputs = ev.processor(images=images, text=texts)
    with torch.no_grad():
        own = model(**inputs, k=2)
    itc = patch_align_retrieval_scores(model, ev.processor, images, texts, k=2, itm=False)
    torch.testing.assert_close(itc, own.itc_scores, rtol=0, atol=1e-6)
    reranked = patch_align_retrieval_scores(model, ev.processor, images, texts, k=2, batch_size=2)
    top = own.i2t_scores.isfinite()  # each image's top-2 texts: ITM probability + 10, above every ITC score
    torch.testing.assert_close(reranked[top], own.i2t_scores[top] + 10.0, rtol=0, atol=1e-5)
    assert (reranked[top].min() > 9.0) and (reranked[~top & ~own.t2i_scores.t().isfinite()].abs() <= 1.0).all()

    # patch_detector.itm_text_aware: eval's re-ranking prunes each pair's image by that pair's text, as the head does
    # (noise images: every patch differs, so which ones the detector keeps matters)
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    noisy_inputs = ev.processor(images=noisy, text=texts)
    with torch.no_grad():
        agnostic = patch_align_retrieval_scores(model, ev.processor, noisy, texts, k=2, batch_size=3)
        model.config.patch_detector["itm_text_aware"] = True
        aware = model(**noisy_inputs, k=2)
    aware_reranked = patch_align_retrieval_scores(model, ev.processor, noisy, texts, k=2, batch_size=3)
    top = aware.i2t_scores.isfinite()
    torch.testing.assert_close(aware_reranked[top], aware.i2t_scores[top] + 10.0, rtol=0, atol=1e-5)
    print("max |text-aware - agnostic| ITM prob:", float((aware_reranked[top] - agnostic[top]).abs().max()))
    assert not torch.allclose(aware_reranked[top], agnostic[top], rtol=0, atol=1e-6)  # the pruning did change


@pytest.mark.slow
def test_bad_keep_ratio_sweep_is_one_clear_error(checkpoint: Path, capsys):
    assert main(["--model", str(checkpoint), "--task", "speed", "--sweep", "1.0,1.5", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanvlp-eval: error:") and "keep ratios in (0, 1]" in err and "1.5" in err
    assert EvalArguments(model="m", task="speed", sweep="1.0, 0.7,0.3").sweep_values == [1.0, 0.7, 0.3]
