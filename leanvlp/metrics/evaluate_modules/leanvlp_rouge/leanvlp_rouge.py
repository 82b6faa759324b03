"""ROUGE-L exactly as the COCO caption evaluation defines it, as a local evaluate module.

Loads by path with the Hub offline: `leanvlp.metrics.load("rouge")`. The computation is
`leanvlp.metrics.caption.rouge_l` (imported absolutely: evaluate copies this file into its cache).
"""

import evaluate
from leanvlp.metrics import text_pair_features
from leanvlp.metrics.caption import rouge_l

_CITATION = """\
@inproceedings{lin2004rouge,
  title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out}, year={2004}
}
"""

_DESCRIPTION = (
    "ROUGE-L as in pycocoevalcap: LCS F-score (beta 1.2) from the best precision and the best recall "
    "over the references, averaged over samples."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one generated caption per sample.
    references: list of list of str (or list of str), the reference captions per sample.
Returns:
    rouge_l: float in [0, 1].
"""


class LeanvlpRouge(evaluate.Metric):
    """ROUGE-L (COCO caption definition)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=text_pair_features(),
        )

    def _compute(self, predictions: list[str], references: list) -> dict[str, float]:
        return {"rouge_l": rouge_l(predictions, references)}
