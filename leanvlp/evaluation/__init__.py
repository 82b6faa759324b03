"""`eval.py` / `leanvlp-eval`: quality and speed of a saved leanvlp model, into eval_results.json and its card.

    python eval.py --model DIR --task caption                    # shapes held-out images, BLEU / CIDEr-D / ROUGE-L
    python eval.py --model DIR --task vqa --data coco --data_path /data/coco --split val2017
    python eval.py --model DIR --task retrieval --num_images 100
    python eval.py --model DIR --task speed --sweep 0,4,8,16     # on vs off, plus a speed-vs-quality PNG

Tasks
- caption: greedy (or beam) captions of held-out images -> BLEU-1..4, CIDEr-D, ROUGE-L (`leanvlp.metrics`), and
  the teacher-forced token accuracy on each image's first reference caption; on shapes also the object
  mentions (precision / recall / F1 of the (colour, shape) pairs a caption names vs those in the image).
- vqa: an answer to every question of every image (the family's VQA prompt) -> VQA soft accuracy.
- retrieval: R@1/5/10 in both directions and their mean. MergeBridge is generative, so this is
  **likelihood-based retrieval**: score[i, j] = the mean log-likelihood of caption j (its tokens and EOS) given
  image i; every caption of an image counts as a positive. PatchAlign: ITC similarity for every pair, each row's
  top-k re-ranked by the ITM head; with boxes in the data also `pta_precision`, the patch detector's R-precision.
- speed: the family's technique on and off side by side, same weights (MergeBridge: bridge merging at the
  config's r vs r=0; PatchAlign: the patch detector at the config's keep ratio vs 1.0, which equals no pruning): FLOPs per image of the image encoding and of one full caption forward
  (`torch.utils.flop_counter`), visual tokens at each stage, throughput (warm-up, then the median of repeats) and
  peak memory. `--sweep 0,4,8` also measures speed and caption CIDEr-D for each value (MergeBridge: r) and draws
  `speed_quality.png` in the model folder (PatchAlign: keep ratios, e.g. `--sweep 1.0,0.7,0.5,0.3`).

Peak memory is the extra memory a call needs over the loaded model and its inputs (how, per device: see
`leanvlp.evaluation.speed`).

Data: `--data shapes` scores the held-out split that train.py scores too (`leanvlp.data.shapes.make_shapes_held_out`:
images from index 1,000,000 on; training uses the first indices), `coco` reads a COCO folder and `hf` any `datasets`
dataset (see `leanvlp.data`); the first `--num_images` images are used. Each entry records how many it scored.

Each run replaces the entry with the same task, dataset, split and number of items in `DIR/eval_results.json`
(format in `leanvlp.model_card`), keeps the others (an entry on another number of images stays beside it, and a
line says so), and regenerates `DIR/README.md`, so the card's model-index always equals the file.

Modules, in the order data flows through them:

    arguments   EvalArguments (the flags) and the eval set they name
    inputs      processor batches and pixels on the model's device and dtype
    generation  caption and vqa: generated text against references, token accuracy
    retrieval   score matrices (likelihood / ITC + ITM), R@k, the detector's R-precision
    speed       FLOPs, peak memory, throughput; technique on vs off, the sweep and its plot
    families    one evaluator per model family, the dispatch from config.json's model_type
    results     eval_results.json updates and the printed tables
    cli         run_evaluation and main
"""

from .arguments import EvalArguments, load_eval_data
from .cli import main, run_evaluation
from .families import EVALUATORS, MergeBridgeEvaluator, PatchAlignEvaluator, load_evaluator, patch_align_report
from .generation import caption_report, patch_align_generation_report
from .results import update_eval_results
from .retrieval import caption_log_likelihoods, detector_precision, patch_align_retrieval_scores
from .speed import LiveTensorBytes, count_flops, peak_memory

__all__ = [
    "EVALUATORS",
    "EvalArguments",
    "LiveTensorBytes",
    "MergeBridgeEvaluator",
    "PatchAlignEvaluator",
    "caption_log_likelihoods",
    "caption_report",
    "count_flops",
    "detector_precision",
    "load_eval_data",
    "load_evaluator",
    "main",
    "patch_align_generation_report",
    "patch_align_report",
    "patch_align_retrieval_scores",
    "peak_memory",
    "run_evaluation",
    "update_eval_results",
]
