"""Evaluate a saved leanvlp model (caption, vqa, retrieval, speed) into its eval_results.json and model card.

See `python eval.py --help` and `leanvlp/evaluation/` (one module per task; cli.py is the entry point).
"""

from leanvlp.evaluation import main

if __name__ == "__main__":
    raise SystemExit(main())
