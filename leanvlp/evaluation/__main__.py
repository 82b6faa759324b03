"""`python -m leanvlp.evaluation`: the same as eval.py."""

from .cli import main

raise SystemExit(main())
