"""leanvlp: efficient vision-language pretraining, Hugging Face-native.

Importing the package registers every leanvlp model, config and processor with the
transformers Auto classes (see `leanvlp.auto`).
"""

from .auto import AutoEntry, register_all

__version__ = "0.1.0"

# One entry per model family; filled as families land.
ENTRIES: list[AutoEntry] = []

register_all(ENTRIES)

__all__ = ["ENTRIES", "AutoEntry", "__version__"]
