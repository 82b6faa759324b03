"""The Trainer subclass, its callbacks and the loss curve: every loss term a model returns is logged."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..checkpoints import CheckpointCompleteMarker, resolve_resume
from ..data.webdataset import WebDatasetStream, webdataset_dataloader


def is_loss_term(key: str) -> bool:
    """A loss term among a model's outputs: `*_loss` or `loss_*` (PatchAlign), not the total `loss`."""
    return key != "loss" and key != "train_loss" and (key.endswith("_loss") or key.startswith("loss_"))


class LeanTrainer(Trainer):
    """Trainer that also logs every loss term a model returns (`*_loss` / `loss_*` output fields), averaged over
    the micro-batches of each logging window and over processes, beside Trainer's own `loss`. With ITC logits
    (`logits_per_image`, (B, B_all)) it logs `itc_columns`: how many texts each image was contrasted with, which
    is the global batch when the negatives are gathered from every process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts: dict[str, list[float]] = defaultdict(list)
        self.add_callback(CheckpointCompleteMarker())

    def get_train_dataloader(self) -> Any:
        """A WebDataset stream is split per process and worker already, so it is not accelerate-prepared."""
        if isinstance(self.train_dataset, WebDatasetStream):
            return webdataset_dataloader(self.train_dataset, self.args, self.data_collator)
        return super().get_train_dataloader()

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """As Trainer's, but resumes only from a complete checkpoint ("latest": the newest complete one)."""
        return super().train(resume_from_checkpoint=resolve_resume(resume_from_checkpoint, self.args.output_dir),
                             **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("the model returned no loss: the batch has no labels / targets")
        for key, value in outputs.items():
            if is_loss_term(key) and value is not None:
                self._parts[key].append(float(value.detach()))
        if outputs.get("logits_per_image") is not None:
            self._parts["itc_columns"].append(float(outputs["logits_per_image"].shape[1]))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._parts and "loss" in logs:
            names = sorted(self._parts)
            local = torch.tensor([[sum(self._parts[n]), len(self._parts[n])] for n in names],
                                 device=self.accelerator.device, dtype=torch.float64)
            total = self.accelerator.reduce(local, reduction="sum")
            for name, (value, count) in zip(names, total.tolist()):
                logs[name] = round(value / max(count, 1.0), 6)
            self._parts.clear()
        super().log(logs, *args, **kwargs)


class CollatorEpoch(TrainerCallback):
    """Tells a collator the epoch that starts (before its first batch is collated)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.collator.epoch = int(state.epoch or 0)


def save_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """A PNG of every logged loss term against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for entry in log_history:
        for key, value in entry.items():
            if (key == "loss" or is_loss_term(key)) and "step" in entry and isinstance(value, (int, float)):
                series[key][0].append(entry["step"])
                series[key][1].append(value)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
