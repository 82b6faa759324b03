"""CIDEr-D exactly as the COCO caption evaluation defines it, as a local evaluate module.

Loads by path with the Hub offline: `leanvlp.metrics.load("cider")`. The computation is
`leanvlp.metrics.caption.cider_d` (imported absolutely: evaluate copies this file into its cache).
The idf comes from the references of all samples passed in one `compute` call.
"""

import evaluate
from leanvlp.metrics import text_pair_features
from leanvlp.metrics.caption import cider_d

_CITATION = """\
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR}, year={2015}
}
"""

_DESCRIPTION = (
    "CIDEr-D as in pycocoevalcap: tf-idf n-gram (1..4) cosine with clipping and a Gaussian length "
    "penalty (sigma 6), times 10, averaged over references and samples."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one generated caption per sample.
    references: list of list of str (or list of str), the reference captions per sample.
Returns:
    cider: float in [0, 10] (papers print it x100).
"""


class LeanvlpCider(evaluate.Metric):
    """CIDEr-D (COCO caption definition)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=text_pair_features(),
        )

    def _compute(self, predictions: list[str], references: list) -> dict[str, float]:
        return {"cider": cider_d(predictions, references)}
