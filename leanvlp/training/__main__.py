"""`python -m leanvlp.training`: the same as train.py."""

from .cli import main

raise SystemExit(main())
