"""Offline metrics: caption (BLEU, CIDEr-D, ROUGE-L), object mentions (shapes), VQA soft accuracy, retrieval recall.

Plain functions need nothing but numpy. The same metrics exist as local `evaluate` modules
(`evaluate.load("bleu")` downloads from the Hub; ours load by path): `load("cider")` returns
`evaluate.load(<path of leanvlp_cider>)`. evaluate copies the module into `HF_MODULES_CACHE`
(default ~/.cache/huggingface/modules; set HF_HOME or HF_MODULES_CACHE before importing
evaluate to move it) and needs the installed `leanvlp` package to import the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .caption import bleu, caption_metrics, cider_d, cider_d_scores, rouge_l, rouge_l_scores, tokenize
from .objects import mentioned_objects, object_mention_scores
from .retrieval import retrieval_ranks, retrieval_recall
from .vqa import normalize_answer, vqa_accuracy, vqa_score

EVALUATE_MODULES_DIR = Path(__file__).resolve().parent / "evaluate_modules"
EVALUATE_MODULES = ("bleu", "cider", "rouge", "vqa_accuracy", "retrieval")


def text_pair_features() -> list:
    """evaluate input spec shared by our modules: one prediction string per sample and either a list of
    reference strings or a single reference string."""
    import datasets

    return [
        datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
        datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
    ]


def module_path(name: str) -> Path:
    """Folder of the local evaluate module `name` (one of EVALUATE_MODULES)."""
    short = name.removeprefix("leanvlp_")
    if short not in EVALUATE_MODULES:
        raise ValueError(f"unknown metric name {name!r}; expected one of {list(EVALUATE_MODULES)}")
    return EVALUATE_MODULES_DIR / f"leanvlp_{short}"


def load(name: str, **kwargs: Any) -> Any:
    """`evaluate.load` of our local module `name` by path: works with the Hub offline."""
    import evaluate  # heavy (pulls in datasets); only needed here

    return evaluate.load(str(module_path(name)), **kwargs)


__all__ = [
    "text_pair_features",
    "EVALUATE_MODULES",
    "bleu",
    "caption_metrics",
    "cider_d",
    "cider_d_scores",
    "load",
    "mentioned_objects",
    "module_path",
    "normalize_answer",
    "object_mention_scores",
    "retrieval_ranks",
    "retrieval_recall",
    "rouge_l",
    "rouge_l_scores",
    "tokenize",
    "vqa_accuracy",
    "vqa_score",
]
