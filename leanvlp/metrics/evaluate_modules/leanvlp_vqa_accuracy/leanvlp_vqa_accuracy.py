"""VQAv2 soft accuracy with answer normalisation, as a local evaluate module.

Loads by path with the Hub offline: `leanvlp.metrics.load("vqa_accuracy")`. The computation is
`leanvlp.metrics.vqa.vqa_accuracy` (imported absolutely: evaluate copies this file into its cache).
"""

import evaluate
from leanvlp.metrics import text_pair_features
from leanvlp.metrics.vqa import vqa_accuracy

_CITATION = """\
@inproceedings{goyal2017vqav2,
  title={Making the V in VQA Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR}, year={2017}
}
"""

_DESCRIPTION = (
    "VQA soft accuracy: mean over the leave-one-out subsets of the annotators' answers of "
    "min(1, matches / 3), after VQAv2 answer normalisation (punctuation, number words, articles, "
    "contractions)."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one predicted answer per question.
    references: list of list of str, the annotators' answers per question (VQAv2: 10).
Returns:
    vqa_accuracy: float in [0, 1].
"""


class LeanvlpVqaAccuracy(evaluate.Metric):
    """VQAv2 soft accuracy."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=text_pair_features(),
        )

    def _compute(self, predictions: list[str], references: list) -> dict[str, float]:
        return {"vqa_accuracy": vqa_accuracy(predictions, references)}
