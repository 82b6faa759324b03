"""Train leanvlp models with transformers' Trainer. `python train.py` runs the tiny CPU demo.

See `python train.py --help` and `leanvlp/training/` (cli.py is the entry point).
"""

from leanvlp.training import main

if __name__ == "__main__":
    raise SystemExit(main())
