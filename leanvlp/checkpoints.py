"""Training checkpoints that are complete or visibly not: a marker written last, checked before resuming.

Trainer writes `checkpoint-N/` file by file; a process killed while it writes leaves a folder that looks like
a checkpoint and fails on resume (a missing `trainer_state.json`, a truncated `model.safetensors`). leanvlp
writes `leanvlp_checkpoint.json` (each file's size) once Trainer has finished the folder (`on_save`), and
`resolve_resume` accepts a folder only when every listed file is there at its size and every safetensors
file's header reads. `--resume_from_checkpoint latest` takes the newest complete checkpoint and names each
newer, partial one it skips.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

MARKER = "leanvlp_checkpoint.json"
LATEST = ("latest", "true", "True")
_STEP = re.compile(r"^checkpoint-(\d+)$")


class CheckpointCompleteMarker(TrainerCallback):
    """After Trainer has saved `checkpoint-<step>`, record its files and sizes (the folder is then complete)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_marker(folder)


def write_marker(folder: Path) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MARKER}
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(folder / MARKER)  # atomic: the marker is there whole or not at all


def checkpoint_problems(folder: Path) -> list[str]:
    """Why `folder` cannot be resumed from (empty when it can)."""
    marker = folder / MARKER
    if not marker.is_file():
        return [f"no {MARKER} (the save did not finish)"]
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return [f"{MARKER} is unreadable ({err})"]
    problems = []
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} were written")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError
            problems.append(f"{path.name} is not a readable safetensors file ({err})")
    return problems


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint folder to resume from: `value` checked, or the newest complete one for "latest"."""
    if value in (None, False, ""):
        return None
    if value is True or value in LATEST:
        steps = sorted(((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                        if p.is_dir() and (m := _STEP.match(p.name))), reverse=True)
        for _, folder in steps:
            problems = checkpoint_problems(folder)
            if not problems:
                return str(folder)
            logger.warning(f"resume_from_checkpoint: skipping the partial checkpoint {folder}: {'; '.join(problems)}")
        raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {output_dir} "
                         f"({len(steps)} checkpoint folder(s) found)")
    folder = Path(value)
    if not folder.is_dir():
        raise ValueError(f"resume_from_checkpoint: {folder} is not a folder")
    problems = checkpoint_problems(folder)
    if problems:
        raise ValueError(f"resume_from_checkpoint: {folder} is not a complete checkpoint: {'; '.join(problems)}")
    return str(folder)


__all__ = ["MARKER", "CheckpointCompleteMarker", "checkpoint_problems", "resolve_resume", "write_marker"]
