"""Registration of leanvlp's configs, models and processors with the transformers Auto classes.

`import leanvlp` calls `register_all()`, so a folder saved by leanvlp loads through
`AutoConfig` / `AutoModel...` / `AutoProcessor` with no `trust_remote_code`. Each model family
adds one `AutoEntry` to `ENTRIES` (in `leanvlp/__init__.py`); the same entry also marks the
classes with `register_for_auto_class`, so `save_pretrained` writes an `auto_map` and copies the
modeling files for users who do not have leanvlp installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers
from transformers import AutoConfig, AutoProcessor, PretrainedConfig


@dataclass(frozen=True)
class AutoEntry:
    """One model family: its config, its model classes keyed by Auto class name, its processor."""

    config_class: type[PretrainedConfig]
    models: dict[str, type] = field(default_factory=dict)  # e.g. {"AutoModel": MyModel}
    processor_class: type | None = None


def register(entry: AutoEntry) -> None:
    """Register one family with the Auto classes (idempotent) and mark it for remote code."""
    model_type = entry.config_class.model_type
    try:
        AutoConfig.register(model_type, entry.config_class)
    except ValueError:  # already registered by an earlier import
        pass
    entry.config_class.register_for_auto_class()
    for auto_name, model_class in entry.models.items():
        auto_class = getattr(transformers, auto_name)
        try:
            auto_class.register(entry.config_class, model_class, exist_ok=True)
        except TypeError:
            auto_class.register(entry.config_class, model_class)
        model_class.register_for_auto_class(auto_name)
    if entry.processor_class is not None:
        AutoProcessor.register(entry.config_class, entry.processor_class, exist_ok=True)
        entry.processor_class.register_for_auto_class("AutoProcessor")


def register_all(entries: list[AutoEntry]) -> None:
    for entry in entries:
        register(entry)


__all__ = ["AutoEntry", "register", "register_all"]
