"""leanvlp.metrics: hand-worked examples, pycocoevalcap as oracle, VQAv2 leave-one-out, retrieval ranks,
and the local evaluate modules loading offline."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from leanvlp.metrics import (
    EVALUATE_MODULES,
    bleu,
    caption_metrics,
    cider_d,
    cider_d_scores,
    module_path,
    normalize_answer,
    retrieval_ranks,
    retrieval_recall,
    rouge_l,
    rouge_l_scores,
    tokenize,
    vqa_accuracy,
    vqa_score,
)

# ------------------------------------------------------------------------------------ helpers

SIZES = ["small", "big", "tiny", "large"]
COLORS = ["red", "blue", "green", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
PLACES = ["on the left", "on the right", "at the top", "in the middle", "at the bottom"]
TEMPLATES = [
    "A {size} {color} {shape} {place}.",
    "There is a {color} {shape} {place}",
    "{color} {shape}, {size}!",
    "An image of a {size} {color} {shape} {place}.",
    "The {shape} {place} is {color}",
]


def caption_corpus(n: int = 40, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Templated captions of one shape per image: 1-5 references, a partly wrong prediction."""
    rng = random.Random(seed)
    preds, refs = [], []
    for _ in range(n):
        pools = {"size": SIZES, "color": COLORS, "shape": SHAPES, "place": PLACES}
        truth = {key: rng.choice(pool) for key, pool in pools.items()}
        refs.append([rng.choice(TEMPLATES).format(**truth) for _ in range(rng.randint(1, 5))])
        guess = {key: value if rng.random() > 0.3 else rng.choice(pools[key]) for key, value in truth.items()}
        preds.append(rng.choice(TEMPLATES).format(**guess))
    return preds, refs


def coco_inputs(preds: list[str], refs: list[list[str]]) -> tuple[dict, dict]:
    """pycocoevalcap's input dicts, fed our tokenisation as space-joined strings."""
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(tokenize(p))] for i, p in enumerate(preds)}
    return gts, res


# ------------------------------------------------------------------------------- tokenisation


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A Dog's toy, on the LEFT!  (2.5 m)") == ["a", "dogs", "toy", "on", "the", "left", "2", "5", "m"]
    assert tokenize("") == []
    with pytest.raises(TypeError, match="caption must be a str"):
        tokenize(None)


# ---------------------------------------------------------------------------------------- BLEU


def test_bleu_hand_computed_single_sample():
    # cand "the cat sat on the mat" (6 tokens); refs r1 "the cat is on the mat", r2 "a cat sat on a mat".
    # 1-grams: the x2 (r1 has 2), cat, sat (r2), on, mat -> 6/6.
    # 2-grams: the cat (r1), cat sat (r2), sat on (r2), on the (r1), the mat (r1) -> 5/5.
    # 3-grams: the cat sat x, cat sat on (r2), sat on the x, on the mat (r1) -> 2/4.
    # 4-grams: the cat sat on, cat sat on the, sat on the mat: none in r1 or r2 -> 0/3.
    # closest ref length 6 = 6 -> BP 1. BLEU-3 = (1 * 1 * 1/2) ** (1/3).
    s = bleu(["the cat sat on the mat"], [["the cat is on the mat", "a cat sat on a mat"]])
    assert s["bleu_1"] == pytest.approx(1.0)
    assert s["bleu_2"] == pytest.approx(1.0)
    assert s["bleu_3"] == pytest.approx(0.5 ** (1 / 3))
    assert s["bleu_4"] == 0.0


def test_bleu_is_corpus_level_with_brevity_penalty():
    # Sample 2: cand "the cat" (2) vs refs of 6 and 4 tokens -> closest 4; 1-grams 2/2, 2-grams 1/1, no 3/4-grams.
    # Corpus sums with sample 1 above: p1 = 8/8, p2 = 6/6, p3 = 2/4, p4 = 0/3; H = 8, R = 6 + 4 = 10.
    # BP = exp(1 - 10/8) = exp(-0.25) for every order (one penalty for the whole corpus).
    preds = ["the cat sat on the mat", "the cat"]
    refs = [["the cat is on the mat", "a cat sat on a mat"], ["the cat sat on the mat", "the cat is here"]]
    s = bleu(preds, refs)
    bp = math.exp(-0.25)
    assert s["bleu_1"] == pytest.approx(bp)
    assert s["bleu_2"] == pytest.approx(bp)
    assert s["bleu_3"] == pytest.approx(bp * 0.5 ** (1 / 3))
    assert s["bleu_4"] == 0.0


def test_bleu_closest_reference_length_ties_go_to_the_shorter():
    # cand 5 tokens, refs of 4 and 6 tokens: both 1 away -> R = 4 <= H = 5 -> BP = 1 (6 would give exp(-0.2)).
    s = bleu(["a b c d e"], [["a b c d", "a b c d e f"]], max_order=1)
    assert s == {"bleu_1": pytest.approx(1.0)}


# ------------------------------------------------------------------------------------- CIDEr-D


def test_cider_d_hand_computed_unigrams():
    # max_order=1, N = 2 images -> idf(g) = ln 2 - ln(max(1, df(g))).
    # df over references: red 1, circle 2, blue 1, square 0 -> weights red ln2, circle 0, blue ln2, square ln2.
    # A: cand = ref = {red: ln2, circle: 0} -> cosine 1, same length -> 10 * 1 = 10.
    # B: cand {blue: ln2, square: ln2} (norm ln2*sqrt2), ref {blue: ln2, circle: 0} (norm ln2):
    #    dot = ln2 * ln2 -> cosine 1/sqrt2, same length -> 10/sqrt2.
    preds, refs = ["red circle", "blue square"], [["red circle"], ["blue circle"]]
    per_sample = cider_d_scores(preds, refs, max_order=1)
    assert per_sample == pytest.approx([10.0, 10.0 / math.sqrt(2)])
    assert cider_d(preds, refs, max_order=1) == pytest.approx((10.0 + 10.0 / math.sqrt(2)) / 2)


def test_cider_d_clipping_and_length_penalty():
    # B: cand "blue blue blue" -> {blue: 3 ln2}, ref "blue circle" -> {blue: ln2, circle: 0}.
    # CIDEr-D clips: dot = min(3 ln2, ln2) * ln2 = ln2^2; cosine = ln2^2 / (3 ln2 * ln2) = 1/3
    # (plain cosine would be 1). Length 3 vs 2 -> penalty exp(-1 / (2 * 6^2)) = exp(-1/72).
    preds, refs = ["red circle", "blue blue blue"], [["red circle"], ["blue circle"]]
    assert cider_d_scores(preds, refs, max_order=1)[1] == pytest.approx(10 / 3 * math.exp(-1 / 72))


def test_cider_d_one_sample_corpus_scores_zero():
    # N = 1: every reference n-gram has df 1 = N -> idf 0, so nothing is informative.
    assert cider_d(["a red circle"], [["a red circle"]]) == 0.0


# ------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_computed_best_precision_and_recall_from_different_refs():
    # cand "a red circle on the left" (6). r1 "the red circle is on the left side" (8): LCS "red circle on
    # the left" = 5 -> P 5/6, R 5/8. r2 "a circle" (2): LCS 2 -> P 2/6, R 2/2 = 1.
    # P = max = 5/6 (r1), R = max = 1 (r2): F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 5/6 / (1 + 1.2).
    cand, refs = "a red circle on the left", ["the red circle is on the left side", "a circle"]
    expected = 2.44 * (5 / 6) / (1 + 1.44 * 5 / 6)
    assert rouge_l_scores([cand], [refs]) == pytest.approx([expected])
    assert expected == pytest.approx(0.9242424242)
    assert rouge_l([cand, ""], [refs, ["x"]]) == pytest.approx(expected / 2)  # empty candidate scores 0


# ------------------------------------------------------------------------- pycocoevalcap oracle


def test_caption_metrics_match_pycocoevalcap_on_a_corpus():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = caption_corpus(40)
    gts, res = coco_inputs(preds, refs)
    coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    coco_cider, coco_cider_each = Cider().compute_score(gts, res)
    coco_rouge, coco_rouge_each = Rouge().compute_score(gts, res)

    ours = caption_metrics(preds, refs)  # raw captions: tokenised internally the same way
    assert min(coco_bleu) > 0.1  # a corpus with real 4-gram matches, so no smoothing artefacts
    for n in range(1, 5):
        assert ours[f"bleu_{n}"] == pytest.approx(coco_bleu[n - 1], abs=1e-6)
    assert ours["cider"] == pytest.approx(coco_cider, abs=1e-6)
    assert ours["rouge_l"] == pytest.approx(coco_rouge, abs=1e-6)
    assert cider_d_scores(preds, refs) == pytest.approx(list(coco_cider_each), abs=1e-6)
    assert rouge_l_scores(preds, refs) == pytest.approx(list(coco_rouge_each), abs=1e-6)


def test_cider_d_idf_depends_on_the_corpus_like_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    preds, refs = caption_corpus(60, seed=1)
    for size in (2, 7, 60):  # the same first sample scores differently in different corpora
        gts, res = coco_inputs(preds[:size], refs[:size])
        _, each = Cider().compute_score(gts, res)
        assert cider_d_scores(preds[:size], refs[:size])[0] == pytest.approx(each[0], abs=1e-6)


def test_caption_metrics_bad_input():
    with pytest.raises(ValueError, match="differ in length: 2 != 1"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="predictions is empty"):
        rouge_l([], [])
    with pytest.raises(TypeError, match="not a single str"):
        bleu("a cat", ["a cat"])
    with pytest.raises(ValueError, match="max_order"):
        bleu(["a"], ["a"], max_order=0)


# ----------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("yes.", "yes"),
        ("a dog", "dog"),
        ("The  Dog ", "dog"),
        ("t-shirt", "t shirt"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("dont know!", "don't know"),
        ("none", "0"),
        ("red, white", "red white"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def _leave_one_out_oracle(prediction: str, answers: list[str]) -> float:
    """VQAv2 by its definition: mean over the subsets missing one answer of min(1, matches / 3)."""
    pred = normalize_answer(prediction)
    subsets = list(combinations(range(len(answers)), len(answers) - 1))
    return sum(min(1.0, sum(normalize_answer(answers[i]) == pred for i in s) / 3) for s in subsets) / len(subsets)


def test_vqa_soft_accuracy_leave_one_out_with_10_answers():
    # k of 10 annotators agree: the k subsets without one of them hold k - 1 matches, the other 10 - k hold k.
    # k = 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6;  k = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9;  k = 4: all subsets >= 3 -> 1.
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}
    for k, value in expected.items():
        answers = ["2"] * k + ["3"] * (10 - k)
        assert vqa_score("Two", answers) == pytest.approx(value)
    for k in range(11):
        answers = ["dog"] * k + ["cat", "a cat", "Cat.", "horse", "two dogs"][: 10 - k] + ["cow"] * max(0, 5 - k)
        assert vqa_score("A dog", answers) == pytest.approx(_leave_one_out_oracle("A dog", answers))


def test_vqa_normalisation_applies_to_prediction_and_answers():
    assert vqa_score("yes.", ["Yes"] * 10) == 1.0
    assert vqa_score("a dog", ["dog", "the dog", "Dog!"] + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_score("2", ["two"] * 2 + ["three"] * 8) == pytest.approx(0.6)


def test_vqa_fewer_than_10_answers():
    # 1 answer: exact match. n >= 2: leave-one-out with threshold min(3, n - 1).
    assert vqa_score("dog", ["dog"]) == 1.0
    assert vqa_score("cat", ["dog"]) == 0.0
    assert vqa_score("dog", ["dog", "cat"]) == pytest.approx(0.5)  # subsets {cat}: 0, {dog}: 1
    assert vqa_score("dog", ["dog"] * 3) == pytest.approx(1.0)  # unanimous -> full score
    assert vqa_score("dog", ["dog", "cat", "cow"]) == pytest.approx(1 / 3)  # {cat,cow}: 0, 2 x 1/2


def test_vqa_accuracy_is_the_mean_and_validates():
    preds = ["Two", "no", "dog"]
    refs = [["2"] * 3 + ["3"] * 7, ["yes"] * 10, ["dog"]]
    assert vqa_accuracy(preds, refs) == pytest.approx((0.9 + 0.0 + 1.0) / 3)
    with pytest.raises(ValueError, match="differ in length"):
        vqa_accuracy(["a"], [])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(TypeError, match="answer must be a str"):
        vqa_accuracy([3], [["3"]])


# ----------------------------------------------------------------------------------- retrieval


def test_retrieval_square_hand_computed():
    # image 0: own text 0.9 is top -> rank 0; image 1: text 0 (0.8) beats own 0.7 -> rank 1; image 2: rank 0.
    # text columns: [0.9, 0.8, 0.1] own 0 -> 0; [0.1, 0.7, 0.2] own 1 -> 0; [0.3, 0.2, 0.6] own 2 -> 0.
    sim = [[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.1, 0.2, 0.6]]
    i2t, t2i = retrieval_ranks(sim)
    assert i2t.tolist() == [0, 1, 0] and t2i.tolist() == [0, 0, 0]
    s = retrieval_recall(torch.tensor(sim))
    assert s["i2t_r1"] == pytest.approx(2 / 3) and s["t2i_r1"] == 1.0
    assert s["i2t_r5"] == s["i2t_r10"] == s["t2i_r5"] == s["t2i_r10"] == 1.0
    assert s["r_mean"] == pytest.approx((2 / 3 + 1 + 1 + 1 + 1 + 1) / 6)


def test_retrieval_several_captions_per_image():
    # texts 0,1 -> image 0; texts 2,3 -> image 1.
    # image 0: own captions 0.2 and 0.9, best 0.9 beats the others (0.5, 0.1) -> rank 0 although text 0 is low.
    # image 1: own 0.6, 0.8, best 0.8 > 0.3, 0.4 -> rank 0.
    # text 0: own image 0 scores 0.2 < image 1's 0.3 -> rank 1; texts 1, 2, 3: rank 0.
    sim = np.array([[0.2, 0.9, 0.5, 0.1], [0.3, 0.4, 0.6, 0.8]])
    i2t, t2i = retrieval_ranks(sim, [0, 0, 1, 1])
    assert i2t.tolist() == [0, 0] and t2i.tolist() == [1, 0, 0, 0]
    s = retrieval_recall(sim, [0, 0, 1, 1], ks=(1,))
    assert s == {"i2t_r1": 1.0, "t2i_r1": 0.75, "r_mean": pytest.approx(0.875)}


def test_retrieval_known_ranks_beyond_10():
    # 12 images x 2 captions. Row i: the first i wrong texts score 1.0, own captions 0.5 / 0.2, rest 0 ->
    # image i ranks exactly i, so i2t R@1 = 1/12, R@5 = 5/12, R@10 = 10/12.
    n = 12
    owner = [j // 2 for j in range(2 * n)]
    sim = np.zeros((n, 2 * n))
    for i in range(n):
        wrong = [j for j in range(2 * n) if owner[j] != i]
        sim[i, wrong[:i]] = 1.0
        sim[i, 2 * i], sim[i, 2 * i + 1] = 0.5, 0.2
    i2t, t2i = retrieval_ranks(sim, owner)
    assert i2t.tolist() == list(range(n))
    s = retrieval_recall(sim, owner)
    assert (s["i2t_r1"], s["i2t_r5"], s["i2t_r10"]) == pytest.approx((1 / 12, 5 / 12, 10 / 12))


def test_retrieval_matches_argsort_oracle_on_random_scores():
    rng = np.random.default_rng(0)
    owner = rng.permutation(np.repeat(np.arange(20), 5))  # 20 images x 5 captions, shuffled
    sim = rng.normal(size=(20, 100))  # continuous: no ties, so argsort ranks are exact
    i2t, t2i = retrieval_ranks(sim, owner)
    for i in range(20):
        order = np.argsort(-sim[i])
        assert i2t[i] == min(np.flatnonzero(order == j)[0] for j in np.flatnonzero(owner == i))
    for j in range(100):
        assert t2i[j] == np.flatnonzero(np.argsort(-sim[:, j]) == owner[j])[0]


def test_retrieval_ties_count_against_the_query():
    s = retrieval_recall(np.ones((3, 3)))  # every candidate tied: rank 2 for all
    assert s["i2t_r1"] == s["t2i_r1"] == 0.0 and s["i2t_r5"] == 1.0


def test_retrieval_bad_input():
    with pytest.raises(ValueError, match="must be square"):
        retrieval_recall(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="text_to_image has 2 entries, similarity has 3 texts"):
        retrieval_recall(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match=r"images \[1\] have no text"):
        retrieval_recall(np.zeros((2, 3)), [0, 0, 0])
    with pytest.raises(ValueError, match=r"image indices in \[0, 2\)"):
        retrieval_recall(np.zeros((2, 3)), [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="shape"):
        retrieval_recall(np.zeros(3))


# ---------------------------------------------------------------------------- evaluate modules


def test_module_path_names():
    for name in EVALUATE_MODULES:
        folder = module_path(name)
        assert (folder / f"{folder.name}.py").is_file()
    assert module_path("leanvlp_cider") == module_path("cider")
    with pytest.raises(ValueError, match="unknown metric name 'meteor'"):
        module_path("meteor")


_EVALUATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import leanvlp.metrics as M
    data = json.load(open(sys.argv[1]))
    out = {
        "bleu": M.load("bleu").compute(predictions=data["preds"], references=data["refs"]),
        "cider": M.load("cider").compute(predictions=data["preds"], references=data["refs"]),
        "rouge": M.load("rouge").compute(predictions=data["preds"], references=data["refs"]),
        "vqa_accuracy": M.load("vqa_accuracy").compute(predictions=data["answers"], references=data["vqa_refs"]),
        "retrieval": M.load("retrieval").compute(predictions=data["rows"], references=data["owner"]),
    }
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_evaluate_modules_load_by_path_offline_and_match_plain_functions(tmp_path: Path):
    preds, refs = caption_corpus(30, seed=2)
    answers = ["Two", "yes.", "a dog", "red"]
    vqa_refs = [["2"] * 3 + ["3"] * 7, ["yes"] * 10, ["dog", "cat"], ["blue"] * 10]
    rng = np.random.default_rng(1)
    owner = [i // 2 for i in range(12)]
    sim = rng.normal(size=(6, 12))  # (images, texts)
    data = {"preds": preds, "refs": refs, "answers": answers, "vqa_refs": vqa_refs}
    data |= {"rows": sim.T.tolist(), "owner": owner}  # one row per text query: its scores over images
    (tmp_path / "data.json").write_text(json.dumps(data))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    cmd = [sys.executable, "-c", _EVALUATE_SCRIPT, str(tmp_path / "data.json")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    assert got["bleu"] == pytest.approx(bleu(preds, refs), rel=1e-12)
    assert got["cider"] == {"cider": pytest.approx(cider_d(preds, refs), rel=1e-12)}
    assert got["rouge"] == {"rouge_l": pytest.approx(rouge_l(preds, refs), rel=1e-12)}
    assert got["vqa_accuracy"] == {"vqa_accuracy": pytest.approx(vqa_accuracy(answers, vqa_refs), rel=1e-12)}
    assert got["retrieval"] == pytest.approx(retrieval_recall(sim, owner), rel=1e-12)
    # evaluate copied our modules into the temporary cache, not into ~/.cache
    copied = {p.name for p in (tmp_path / "modules").rglob("leanvlp_*.py")}
    assert copied == {f"leanvlp_{name}.py" for name in EVALUATE_MODULES}
