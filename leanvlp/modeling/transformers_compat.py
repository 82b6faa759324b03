"""The one seam between leanvlp's modeling code and the installed transformers release.

transformers 5.24 renamed the generation cache from `past_key_values` to `cache` everywhere: model
`forward` keywords, `generate()`'s model kwargs and every `ModelOutput` field (5.24 rewrites
`past_key_values=` to `cache=` whenever any `ModelOutput` subclass is built). Code that spells either
name breaks on the other side of 5.24, and saved checkpoints carry this code to the Hub. So leanvlp
never spells it:
  - output classes subclass transformers' own outputs, so the cache field is whatever the installed
    release declares;
  - `forward` passes the cache through `**kwargs` to the LLM untouched;
  - outputs are built from the LLM's output with `outputs_from` (field names copied, not written out);
  - the few places that must read the cache call `get_cache`.
The supported range is checked once, when the configuration modules are imported.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any, TypeVar

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

# Keep equal to pyproject's `transformers` requirement (a test holds them together).
SUPPORTED_TRANSFORMERS = ">=5.18,<6"
# What the installed release calls the generation cache: "cache" from 5.24 on, "past_key_values" before.
CACHE_NAME: str = next(f.name for f in fields(BaseModelOutputWithPast) if f.name in ("cache", "past_key_values"))
_CACHE_NAMES = ("cache", "past_key_values")

Output = TypeVar("Output", bound=ModelOutput)


def check_transformers_version(installed: str | None = None) -> None:
    """One clear line instead of a deep error: too old raises ImportError, newer than tested warns."""
    installed = installed or transformers.__version__
    version = Version(installed)
    supported = SpecifierSet(SUPPORTED_TRANSFORMERS)
    if version in supported:
        return
    lowest = min(Version(s.version) for s in supported if s.operator.startswith(">"))
    message = (f"leanvlp supports transformers {SUPPORTED_TRANSFORMERS} but transformers {installed} is installed; "
               f"run: pip install 'transformers{SUPPORTED_TRANSFORMERS}'")
    if version < lowest:
        raise ImportError(message)
    warnings.warn(message + " (this newer release is untested)", stacklevel=2)


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed in `kwargs`, under either name (generate uses CACHE_NAME; old callers the other)."""
    return next((kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None), None)


def outputs_from(cls: type[Output], source: ModelOutput | None, **extra: Any) -> Output:
    """Build `cls` from `source`'s fields that `cls` declares (the cache under its installed name), plus `extra`."""
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in (source or {}).items() if k in names}
    return cls(**values, **extra)


__all__ = ["CACHE_NAME", "SUPPORTED_TRANSFORMERS", "check_transformers_version", "get_cache", "outputs_from"]
