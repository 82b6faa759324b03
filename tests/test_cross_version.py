"""Checkpoints cross transformers releases: saved under one, loaded under the other, identical outputs.

Needs a second transformers release in a folder (`pip install --no-deps --target DIR transformers==X`), named
by $LEANVLP_OTHER_TRANSFORMERS; `.ci/run` provides the lowest admitted release on the newest leg and the
newest on the lowest leg. Each direction is checked twice, in fresh processes: through the code saved with
the checkpoint (`trust_remote_code=True`, leanvlp not importable) and through installed leanvlp.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

WORKER = Path(__file__).resolve().parent / "cross_version_worker.py"
OTHER = os.environ.get("LEANVLP_OTHER_TRANSFORMERS")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not OTHER, reason="set LEANVLP_OTHER_TRANSFORMERS to a folder holding another transformers "
                                         "release (pip install --no-deps --target DIR transformers==X)"),
]


def _worker(tmp_path: Path, *args: str, transformers_dir: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    extra = ["--transformers-dir", transformers_dir] if transformers_dir else []
    result = subprocess.run([sys.executable, str(WORKER), *args, *extra], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def _other_version() -> str:
    dist = next(Path(OTHER).glob("transformers-*.dist-info"), None)
    assert dist is not None, f"LEANVLP_OTHER_TRANSFORMERS={OTHER} holds no transformers release"
    return dist.name.removeprefix("transformers-").removesuffix(".dist-info")


@pytest.mark.parametrize("direction", ["saved here, loaded there", "saved there, loaded here"])
def test_checkpoints_load_across_releases_with_identical_outputs(tmp_path, direction):
    other = _other_version()
    assert other != transformers.__version__, "the other release is the installed one: nothing is crossed"
    save_dir, load_dir = (None, OTHER) if direction.startswith("saved here") else (OTHER, None)
    saved = _worker(tmp_path, "save", str(tmp_path / "ckpt"), transformers_dir=save_dir)
    assert f"saved with transformers {other if save_dir else transformers.__version__}" in saved
    for mode in ("remote", "installed"):
        out = _worker(tmp_path, "load", str(tmp_path / "ckpt"), mode, transformers_dir=load_dir)
        print(out)
        for family in ("merge_bridge", "patch_align"):
            assert f"{family}: saved with transformers" in out and f"({mode})" in out
