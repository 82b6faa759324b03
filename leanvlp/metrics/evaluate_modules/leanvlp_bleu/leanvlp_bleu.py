"""BLEU-1..4 exactly as the COCO caption evaluation defines it, as a local evaluate module.

Loads by path with the Hub offline: `leanvlp.metrics.load("bleu")`. The computation is
`leanvlp.metrics.caption.bleu` (imported absolutely: evaluate copies this file into its cache).
"""

import evaluate
from leanvlp.metrics import text_pair_features
from leanvlp.metrics.caption import bleu

_CITATION = """\
@inproceedings{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL}, year={2002}
}
"""

_DESCRIPTION = (
    "Corpus-level BLEU-1..4 as in pycocoevalcap: clipped n-gram precision, brevity penalty against "
    "the reference length closest to each candidate. Tokenisation: lowercase, punctuation stripped."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one generated caption per sample.
    references: list of list of str (or list of str), the reference captions per sample.
    max_order: int, highest n-gram order (default 4).
Returns:
    bleu_1 .. bleu_{max_order}: float in [0, 1].
"""


class LeanvlpBleu(evaluate.Metric):
    """BLEU-1..4 (COCO caption definition)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=text_pair_features(),
        )

    def _compute(self, predictions: list[str], references: list, max_order: int = 4) -> dict[str, float]:
        return bleu(predictions, references, max_order=max_order)
