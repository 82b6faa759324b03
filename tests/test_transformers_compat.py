"""The compatibility seam: the supported range is pyproject's, and a release outside it gets one clear line."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest
import transformers

from leanvlp.modeling.transformers_compat import SUPPORTED_TRANSFORMERS, check_transformers_version, get_cache

ROOT = Path(__file__).resolve().parents[1]


def test_supported_range_is_pyprojects_requirement():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [d for d in deps if re.match(r"transformers\b", d)]
    assert requirement.replace(" ", "") == f"transformers{SUPPORTED_TRANSFORMERS}"


def test_installed_release_passes_the_check():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version()
    check_transformers_version(transformers.__version__)


def test_too_old_a_release_raises_one_line_naming_both_versions():
    with pytest.raises(ImportError) as info:
        check_transformers_version("5.17.0")
    message = str(info.value)
    assert "\n" not in message and "5.17.0" in message and SUPPORTED_TRANSFORMERS in message


def test_a_newer_untested_release_warns_naming_both_versions():
    with pytest.warns(UserWarning, match=r"transformers 6\.0\.0 is installed.*untested") as record:
        check_transformers_version("6.0.0")
    assert SUPPORTED_TRANSFORMERS in str(record[0].message)


def test_get_cache_reads_either_name():
    cache = object()
    assert get_cache({"cache": cache}) is cache
    assert get_cache({"past_key_values": cache}) is cache
    assert get_cache({"past_key_values": None}) is None and get_cache({}) is None
