"""Image-text retrieval R@1/5/10 in both directions and their mean, as a local evaluate module.

Loads by path with the Hub offline: `leanvlp.metrics.load("retrieval")`. One example per text
query: `predictions` is that text's similarity to every image, `references` the index of the image
it describes. The computation is `leanvlp.metrics.retrieval.retrieval_recall` on the stacked
(num_images, num_texts) matrix (imported absolutely: evaluate copies this file into its cache).
"""

import datasets
import evaluate
import numpy as np
from leanvlp.metrics.retrieval import retrieval_recall

_CITATION = """\
@article{karpathy2015deep,
  title={Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li},
  journal={CVPR}, year={2015}
}
"""

_DESCRIPTION = (
    "Recall@K for image->text (best-ranked own caption) and text->image retrieval, several captions per "
    "image allowed, plus r_mean, the mean of all recalls. Ties count against the query."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of list of float, per text: its similarity to each of the num_images images.
    references: list of int, per text: the index of the image it describes.
Returns:
    i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, r_mean: float in [0, 1].
"""


class LeanvlpRetrieval(evaluate.Metric):
    """Image-text retrieval recall."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: list[list[float]], references: list[int]) -> dict[str, float]:
        similarity = np.asarray(predictions, dtype=np.float64).T  # (num_images, num_texts)
        return retrieval_recall(similarity, [int(r) for r in references])
