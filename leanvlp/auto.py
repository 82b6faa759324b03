"""Registration of leanvlp's configs, models and processors with the transformers Auto classes.

`import leanvlp` calls `register_all()`, so a folder saved by leanvlp loads through
`AutoConfig` / `AutoModel...` / `AutoProcessor` with no `trust_remote_code`. Each model family
adds one `AutoEntry` to `ENTRIES` (in `leanvlp/__init__.py`); the same entry also marks the
classes with `register_for_auto_class`, so `save_pretrained` writes an `auto_map` and copies the
modeling files for users who do not have leanvlp installed.

A saved folder whose config.json names a model_type nobody registered makes the Auto classes ask
for remote code (leanvlp folders carry an `auto_map`) without naming the type; `check_model_folder`
(and `load_pretrained`, which calls it) says which type, which folder and what is supported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, AutoProcessor, PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class AutoEntry:
    """One model family: its config, its model classes keyed by Auto class name, its processor."""

    config_class: type[PretrainedConfig]
    models: dict[str, type] = field(default_factory=dict)  # e.g. {"AutoModel": MyModel}
    processor_class: type | None = None


_REGISTERED: dict[str, AutoEntry] = {}  # model_type -> its family, filled by `register`


def register(entry: AutoEntry) -> None:
    """Register one family with the Auto classes (idempotent) and mark it for remote code."""
    model_type = entry.config_class.model_type
    _REGISTERED[model_type] = entry
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


def supported_model_types() -> list[str]:
    """The model_types registered by `register` (leanvlp's families), sorted."""
    return sorted(_REGISTERED)


def check_model_folder(folder: str | Path, model_types: Sequence[str] | None = None) -> str | None:
    """The model_type of a saved local folder if it is one of `model_types` (default: every registered family).

    Otherwise a ValueError naming the model_type, the folder and the supported types, before transformers
    resolves the config. A path that is not a local folder (a Hub id) returns None: from_pretrained checks it.
    """
    path = Path(folder)
    if not path.is_dir():
        return None
    supported = sorted(model_types) if model_types is not None else supported_model_types()
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"from_pretrained: config.json is missing (folder {str(path)!r}; save_pretrained "
                                f"writes it; supported model types: {supported})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"from_pretrained: config.json cannot be read ({err}) (folder {str(path)!r})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in supported:
        raise ValueError(f"from_pretrained: model_type {model_type!r} in config.json is not supported (folder "
                         f"{str(path)!r}, supported model types: {supported})")
    return model_type


def load_pretrained(folder: str | Path, auto_class: str = "AutoModelForImageTextToText", **kwargs: Any) -> PreTrainedModel:
    """`<auto_class>.from_pretrained(folder, **kwargs)` after `check_model_folder` (and a check that the family has it)."""
    model_type = check_model_folder(folder)
    entry = _REGISTERED.get(model_type) if model_type is not None else None
    if entry is not None and auto_class not in entry.models:
        raise ValueError(f"from_pretrained: auto_class {auto_class!r} has no {model_type!r} model (folder "
                         f"{str(folder)!r}, {model_type!r} provides: {sorted(entry.models)})")
    return getattr(transformers, auto_class).from_pretrained(folder, **kwargs)


__all__ = ["AutoEntry", "check_model_folder", "load_pretrained", "register", "register_all", "supported_model_types"]
