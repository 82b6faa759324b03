"""`eval.py` / `leanvlp-eval`: load the folder's evaluator, run the task, write eval_results.json and the card."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import transformers

from ..model_card import card_kwargs_from_folder, write_model_card
from .arguments import EvalArguments, dataset_fields, load_eval_data, parse_args
from .families import load_evaluator
from .generation import run_generation_task
from .results import print_entry, update_eval_results
from .retrieval import run_retrieval
from .speed import run_speed, run_sweep


def run_evaluation(args: EvalArguments) -> list[dict[str, Any]]:
    """Evaluate, write eval_results.json and README.md into the model folder; returns the new entries."""
    sweep = args.sweep_values  # bad --sweep fails before any work
    if not args.progress:  # every bar: ours (tqdm), datasets' map / build bars, transformers' weight loading
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    model_dir = Path(args.model)
    ev = load_evaluator(model_dir, args.task, args.device, args.dtype)
    if sweep:
        ev.check_sweep(sweep)
    data = load_eval_data(args, ev.image_size())
    base = {"task": args.task, **dataset_fields(args.data, args.data_path, args.split, len(data))}
    if args.task != "speed":  # speed times one batch; its entry says how many images (batch_images)
        base["num_images"] = len(data)
    if args.task in ("caption", "vqa"):
        results = [{**base, **run_generation_task(ev, data, args)}]
    elif args.task == "retrieval":
        results = [{**base, **run_retrieval(ev, data, args)}]
    else:
        results = [{**base, **run_speed(ev, data, args)}]
        if sweep:
            results.append({**base, **run_sweep(ev, data, args, model_dir / "speed_quality.png")})
    for entry in results:
        update_eval_results(model_dir, entry)
    card = write_model_card(model_dir, **card_kwargs_from_folder(model_dir))
    for entry in results:
        print_entry(entry)
    print(f"results: {model_dir / 'eval_results.json'}   card: {card}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """`eval.py` / `leanvlp-eval`: 0 on success, 2 with a one-line error on bad input."""
    try:
        run_evaluation(parse_args(argv))
    except (OSError, ValueError, TypeError, NotImplementedError) as err:
        print(f"leanvlp-eval: error: {err}", file=sys.stderr)
        return 2
    return 0
