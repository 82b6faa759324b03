"""leanvlp.evaluation (eval.py / leanvlp-eval): all four tasks on a checkpoint trained on shapes, results equal to
the card's model-index, a working card snippet, exact FLOP and token counts, retrieval orientation, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

import leanvlp  # noqa: F401  (registers the Auto classes)
from leanvlp.evaluation import (
    EvalArguments,
    LiveTensorBytes,
    caption_log_likelihoods,
    count_flops,
    main,
    update_eval_results,
)
from leanvlp.metrics import retrieval_recall

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--num_train_images", "24", "--num_eval_images", "4", "--max_steps", "2", "--logging_steps", "1",
         "--per_device_train_batch_size", "8", "--save_strategy", "no", "--max_new_tokens", "3",
         "--tiny_image_size", "32", "--bridge_r", "4", "--tiny_llm_hidden", "32", "--bridge_hidden", "32",
         "--tiny_vision_hidden", "32", "--disable_tqdm", "true"]
SMALL = ["--num_images", "4", "--batch_size", "4", "--max_new_tokens", "3", "--warmup", "1", "--repeats", "1",
         "--progress", "false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny MergeBridge (bridge r=4: 17 -> 13 -> 9 visual tokens) trained for 2 steps on shapes."""
    from leanvlp.training import main as train

    out = tmp_path_factory.mktemp("eval") / "ckpt"
    assert train([*TRAIN, "--output_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def evaluated(checkpoint: Path) -> Path:
    """A copy of the checkpoint after eval.py ran every task (and a sweep) on it."""
    folder = checkpoint.parent / "evaluated"
    shutil.copytree(checkpoint, folder)
    for task in ("caption", "vqa", "retrieval"):
        assert main(["--model", str(folder), "--task", task, *SMALL]) == 0
    assert main(["--model", str(folder), "--task", "speed", "--sweep", "0,4,8", *SMALL]) == 0
    return folder


def entries(folder: Path) -> dict[tuple, dict]:
    results = json.loads((folder / "eval_results.json").read_text())["results"]
    keyed = {(e["task"], e.get("kind")): e for e in results}
    assert len(keyed) == len(results), "one entry per task"
    return keyed


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_every_task_writes_results_that_equal_the_cards_model_index(evaluated: Path):
    results = entries(evaluated)
    assert set(results) == {("caption", None), ("vqa", None), ("retrieval", None), ("speed", None),
                            ("speed", "sweep")}  # train.py's caption entry was replaced, not duplicated
    assert all(e["dataset"] == "leanvlp-shapes" and e["split"] == "held-out[:4]" for e in results.values())
    assert results["caption", None]["dataset_name"] == "leanvlp shapes (procedural; held-out images from index 1,000,000)"
    caption = results["caption", None]["metrics"]
    assert set(caption) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "rouge_l", "token_accuracy",
                            "object_precision", "object_recall", "object_f1"}
    assert results["caption", None]["num_images"] == 4
    assert set(results["vqa", None]["metrics"]) == {"vqa_accuracy", "token_accuracy"}
    assert results["vqa", None]["num_questions"] > 4  # every question of the 4 images, not one per image
    retrieval = results["retrieval", None]
    assert set(retrieval["metrics"]) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"r_mean"}
    assert retrieval["method"].startswith("likelihood") and retrieval["num_images"] == 4

    card = ModelCard.load(evaluated / "README.md")
    index = {(r.task_type, r.dataset_type, r.dataset_split, r.metric_type): r.metric_value
             for r in card.data.eval_results}
    hub_task = {"caption": "image-to-text", "vqa": "visual-question-answering", "retrieval": "image-text-retrieval"}
    expected = {(hub_task[t], e["dataset"], e["split"], name): value
                for (t, _), e in results.items() if t != "speed" for name, value in e["metrics"].items()}
    assert index == expected  # same keys, same unrounded numbers
    assert "merging on (r=4)" in card.text and "sweep r=8" in card.text  # the speed table
    assert (evaluated / "speed_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerunning_a_task_replaces_only_its_entry_and_a_smaller_run_stays_beside_it(evaluated: Path, tmp_path: Path,
                                                                                    capsys):
    folder = tmp_path / "copy"
    shutil.copytree(evaluated, folder)
    before = entries(folder)
    assert main(["--model", str(folder), "--task", "caption", *SMALL]) == 0  # same 4 images: replaced
    assert entries(folder).keys() == before.keys()
    capsys.readouterr()
    assert main(["--model", str(folder), "--task", "caption", *SMALL, "--num_images", "2"]) == 0
    assert "keeps the caption entry on split held-out[:4] beside this one on held-out[:2]" in capsys.readouterr().out
    results = json.loads((folder / "eval_results.json").read_text())["results"]
    captions = [e for e in results if e["task"] == "caption"]
    assert sorted(e["num_images"] for e in captions) == [2, 4]  # the 4-image entry is not silently replaced
    assert [e for e in results if e["task"] != "caption"] == [e for k, e in before.items() if k != ("caption", None)]
    splits = {r.dataset_split for r in ModelCard.load(folder / "README.md").data.eval_results
              if r.task_type == "image-to-text"}
    assert splits == {"held-out[:2]", "held-out[:4]"}


def expected_unmerged_encode_flops(config) -> int:
    """get_image_features FLOPs per image with no merging anywhere: patch conv, ViT layers, bridge, projections.

    A transformer layer on N tokens, width C, MLP width I: q, k, v, out (8 N C^2) + scores and weighted sum
    (4 N^2 C) + MLP (4 N C I); a multiply-add is 2 FLOPs.
    """
    vc, bc = config.vision_config, config.bridge_config
    n, p = config.num_vision_tokens, vc.patch_size

    def layer(c: int, i: int) -> int:
        return 8 * n * c * c + 4 * n * n * c + 4 * n * c * i

    patch_conv = 2 * (n - 1) * vc.hidden_size * 3 * p * p
    vision = vc.num_hidden_layers * layer(vc.hidden_size, vc.intermediate_size)
    bridge = bc.num_hidden_layers * layer(bc.hidden_size, bc.intermediate_size)
    projections = 2 * n * vc.hidden_size * bc.hidden_size + 2 * n * bc.hidden_size * config.text_config.hidden_size
    return patch_conv + vision + bridge + projections


@pytest.mark.slow
def test_speed_flops_shrink_with_merging_and_tokens_equal_the_configs_counts(evaluated: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(evaluated)
    speed = entries(evaluated)["speed", None]
    off, on = speed["settings"]
    assert (off["r"], on["r"]) == (0, 4)
    assert on["encode_flops"] < off["encode_flops"] and on["forward_flops"] < off["forward_flops"]
    assert off["encode_flops"] == expected_unmerged_encode_flops(config)  # attention on CPU counted too

    layers = config.bridge_config.num_hidden_layers
    n_in, n_bridge = config.num_vision_tokens, config.num_bridge_input_tokens
    assert on["tokens"] == {"vision_in": n_in, "vision_out": n_bridge, "bridge_in": n_bridge,
                            "bridge": config.bridge_merging_config.token_counts(n_bridge, layers),
                            "llm_prefix": config.num_image_tokens}
    assert on["tokens"] == on["derived_tokens"] and off["tokens"] == off["derived_tokens"]
    assert on["tokens"]["bridge"] == [13, 9]  # 17 tokens, r=4 in each of 2 layers
    assert off["tokens"] == {"vision_in": n_in, "vision_out": n_bridge, "bridge_in": n_bridge, "bridge": [n_bridge] * layers,
                             "llm_prefix": n_bridge}
    assert speed["metrics"]["flops_reduction_forward"] == off["forward_flops"] / on["forward_flops"] > 1
    assert all(s["peak_memory_bytes"] > 0 and s["generate_images_per_s"] > 0 for s in (off, on))

    sweep = {p["r"]: p for p in entries(evaluated)["speed", "sweep"]["sweep"]}
    assert [sweep[r]["tokens"]["llm_prefix"] for r in (0, 4, 8)] == [17, 9, 5]
    assert sweep[0]["forward_flops"] == off["forward_flops"] and sweep[4]["forward_flops"] == on["forward_flops"]
    assert sweep[0]["forward_flops"] > sweep[4]["forward_flops"] > sweep[8]["forward_flops"]
    # The sweep's r=4 quality is the caption task's (same images, same greedy decoding).
    assert math.isclose(sweep[4]["cider"], entries(evaluated)["caption", None]["metrics"]["cider"], abs_tol=1e-12)


@pytest.mark.slow
def test_card_usage_snippet_runs_against_the_saved_folder(evaluated: Path, tmp_path: Path):
    """The ```python block of README.md, run as is in a fresh offline process (remote code, no `import
    leanvlp`), prints the caption that leanvlp itself generates for the same image."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    text = (evaluated / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert f'model_id = "{evaluated}"' in snippet and "import leanvlp" not in snippet.replace("`import leanvlp`", "")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", snippet], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    processor = AutoProcessor.from_pretrained(evaluated)
    model = AutoModelForImageTextToText.from_pretrained(evaluated)
    inputs = processor(images=Image.new("RGB", (224, 224), "white"), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=30)
    caption = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert result.stdout.splitlines()[-1] == caption


# ----------------------------------------------------------------------------- measuring, unit level


def test_flop_counter_counts_cpu_attention_with_the_sdpa_formula():
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4)
    attention = count_flops(lambda: nn.functional.scaled_dot_product_attention(q, k, k))
    assert attention == 2 * (2 * 2 * 3 * 5 * 7 * 4)  # q k^T and weights x v, 2 FLOPs per multiply-add
    linear = nn.Linear(6, 8)
    assert count_flops(lambda: linear(torch.randn(3, 6))) == 2 * 3 * 6 * 8


def test_live_tensor_bytes_tracks_the_peak_of_tensors_alive_at_once():
    with LiveTensorBytes() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        view = b.view(10, 100)  # a view allocates nothing
        b.add_(1)  # in place: nothing new
        del a  # 4000 live
        c = view + 1  # 8000 live again
    assert tracker.peak == 8000 and tracker.live == 8000
    del b, view, c
    assert tracker.live == 0


# ----------------------------------------------------------------------------- retrieval orientation

COLOURS = ("red", "green", "blue")


class ColourWordLM(nn.Module):
    """A stand-in MergeBridge: every next-token logit is 4 for the colour word of the image and 0 otherwise.

    Token embeddings are one-hot in the first V dims; image features put 2 (in each of 2 prefix slots) on the
    colour word's dim in the last V dims; the LM sums the last V dims over the sequence.
    """

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.vocab = len(tokenizer)
        self.colour_ids = [tokenizer.convert_tokens_to_ids(c) for c in COLOURS]
        self.embed = nn.Embedding(self.vocab, 2 * self.vocab)
        with torch.no_grad():
            self.embed.weight.copy_(torch.cat([torch.eye(self.vocab), torch.zeros(self.vocab, self.vocab)], 1))

    device = torch.device("cpu")
    dtype = torch.float32

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_image_features(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        colour = pixel_values.mean((2, 3)).argmax(-1)  # (B,): the dominant channel, red / green / blue
        features = torch.zeros(len(colour), 2, 2 * self.vocab)  # (B, M=2, C)
        for b, c in enumerate(colour.tolist()):
            features[b, :, self.vocab + self.colour_ids[c]] = 2.0
        return BaseModelOutputWithPooling(pooler_output=features)  # the visual prefix, as MergeBridge returns it

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        logits = inputs_embeds[..., self.vocab:].sum(1, keepdim=True).expand(-1, inputs_embeds.shape[1], -1)
        return SimpleNamespace(logits=logits)


def test_likelihood_retrieval_scores_images_by_texts_in_the_right_orientation():
    from PIL import Image

    from leanvlp import MergeBridgeProcessor
    from leanvlp.tiny import build_word_tokenizer, tiny_image_processor

    texts = ["a red square", "the red one", "a green circle", "a blue star", "red red blue"]
    owner = [0, 0, 1, 2, 2]  # the last caption belongs to the blue image but says "red" twice
    tokenizer = build_word_tokenizer(texts)
    processor = MergeBridgeProcessor(tiny_image_processor(32), tokenizer, num_image_tokens=2)
    images = [Image.new("RGB", (32, 32), rgb) for rgb in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    model = ColourWordLM(tokenizer)

    scores = caption_log_likelihoods(model, processor, images, texts, batch_size=4)  # 15 pairs, 4 batches
    assert scores.shape == (3, 5)  # (images, texts)
    # log p(word | image) = 4 [word = colour] - log(V - 1 + e^4), averaged over the words and EOS
    norm = math.log(model.vocab - 1 + math.exp(4))
    expected = torch.tensor([[4 * t.split().count(c) / (len(t.split()) + 1) - norm for t in texts] for c in COLOURS])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)

    recall = retrieval_recall(scores, owner)
    # image -> text: the red image ranks "red red blue" (not its own) first -> 2 of 3 images right at R@1
    # text -> image: "red red blue" ranks the red image above its own blue one -> 4 of 5 texts right at R@1
    assert recall["i2t_r1"] == pytest.approx(2 / 3) and recall["t2i_r1"] == pytest.approx(4 / 5)
    assert recall["i2t_r5"] == recall["t2i_r5"] == 1.0


# ----------------------------------------------------------------------------- bad input


def test_results_file_update_replaces_same_task_dataset_split_and_validates(tmp_path: Path):
    (tmp_path / "eval_results.json").write_text(json.dumps({"results": [
        {"task": "caption", "dataset": "d", "split": "a", "metrics": {"cider": 1.0}},
        {"task": "caption", "dataset": "d", "split": "b", "metrics": {"cider": 2.0}}]}))
    new = {"task": "caption", "dataset": "d", "split": "a", "metrics": {"cider": 3.0}}
    assert update_eval_results(tmp_path, new) == [
        {"task": "caption", "dataset": "d", "split": "b", "metrics": {"cider": 2.0}}, new]
    with pytest.raises(ValueError, match="finite number"):
        update_eval_results(tmp_path, {**new, "metrics": {"cider": float("nan")}})
    assert json.loads((tmp_path / "eval_results.json").read_text())["results"][-1] == new  # untouched


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "segmentation"], "unknown task 'segmentation'"),
    (["--task", "caption", "--data", "laion"], "unknown dataset kind 'laion'"),
    (["--task", "caption", "--data", "coco"], "--data_path is required"),
    (["--task", "caption", "--num_images", "0"], "--num_images must be >= 1"),
    (["--task", "caption", "--sweep", "0,4"], "--sweep goes with --task speed"),
    (["--task", "speed", "--sweep", "0,four"], "--sweep: expected comma-separated integers"),
])
def test_bad_arguments_are_one_clear_error(argv, message, tmp_path, capsys):
    assert main(["--model", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanvlp-eval: error:") and message in err


def test_model_folder_without_config_names_the_path(tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    assert main(["--model", str(folder), "--task", "caption"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "config.json" in err


def test_a_family_without_eval_support_names_family_and_task(tmp_path, capsys, monkeypatch):
    from leanvlp import evaluation

    monkeypatch.delitem(evaluation.EVALUATORS, "patch_align")  # our own dispatch table, restored after the test
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "patch_align"}))
    assert main(["--model", str(tmp_path), "--task", "retrieval"]) == 2
    err = capsys.readouterr().err
    assert "'retrieval'" in err and "'patch_align'" in err and "not implemented" in err


@pytest.mark.slow
def test_dataset_without_the_tasks_fields_or_rows_is_a_clear_error(checkpoint: Path, tmp_path, capsys):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature
    from PIL import Image

    features = Features({"image": ImageFeature(), "caption": Value("string")})
    captions_only = Dataset.from_dict({"image": [Image.new("RGB", (32, 32), "red")], "caption": ["a red image"]},
                                      features=features)
    captions_only.save_to_disk(tmp_path / "captions_only")
    empty_coco = tmp_path / "coco"
    (empty_coco / "annotations").mkdir(parents=True)
    (empty_coco / "val2017").mkdir()
    (empty_coco / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": [], "annotations": []}))

    common = ["--model", str(checkpoint), *SMALL]
    assert main([*common, "--data", "hf", "--data_path", str(tmp_path / "captions_only"), "--task", "vqa"]) == 2
    err = capsys.readouterr().err
    assert "'questions'" in err and "'answers'" in err
    assert main([*common, "--data", "coco", "--data_path", str(empty_coco), "--task", "caption"]) == 2
    err = capsys.readouterr().err
    assert str(empty_coco) in err and "is empty" in err
    assert not (checkpoint / "eval_results.json").read_text().count('"vqa"')  # nothing written on failure


def test_eval_arguments_defaults():
    args = EvalArguments(model="m", task="caption")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert (args.data, args.split, args.device, args.num_images) == ("shapes", "held-out", device, 100)
    assert EvalArguments(model="m", task="speed", sweep="0, 4,16").sweep_values == [0, 4, 16]


def test_speed_ratio_warnings_name_overlapping_ranges_and_wide_spreads():
    from leanvlp.evaluation.speed import ratio_warnings

    def setting(median: float, low: float, high: float) -> dict:
        return {"generate_images_per_s": median, "generate_images_per_s_min": low, "generate_images_per_s_max": high}

    assert ratio_warnings(setting(10, 9.9, 10.1), setting(20, 19.8, 20.2), "generate") == []  # clearly 2x
    warnings = ratio_warnings(setting(10, 8, 12), setting(11, 10.5, 11.5), "generate")
    assert len(warnings) == 2
    assert "ranges 0.88x-1.44x" in warnings[0] and "either side of 1" in warnings[0]  # 10.5 / 12, 11.5 / 8
    assert "technique off varies by 40% of its median" in warnings[1]
