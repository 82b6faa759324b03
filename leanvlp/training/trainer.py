"""The Trainer subclass, its callbacks and the loss curve: every loss term a model returns is logged."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.utils import find_labels

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
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if kwargs.get("eval_dataset") is None and train_args is not None and train_args.eval_strategy != "no":
            train_args.eval_strategy = "no"  # the default asks for the held-out loss; without held-out data, none
        model = kwargs.get("model", args[0] if args else None)
        if train_args is not None and train_args.label_names is None and model is not None:
            # Trainer computes a held-out loss only when *every* forward argument named "*label*" is in the batch;
            # the LM's `labels` decide, the optional extras (`shift_labels`, semantic-head targets) do not.
            base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the model inside
            names = find_labels(type(base))
            train_args.label_names = ["labels"] if "labels" in names else None
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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Trainer restores weights with a plain `load_state_dict` of the saved file, which silently misses every key
        `save_pretrained` wrote in a checkpoint layout of its own (ViT's attention since transformers 5.9), so a
        trained vision tower would resume from its initial weights; `from_pretrained` maps those keys back."""
        target = model if model is not None else self.model
        if not isinstance(target, PreTrainedModel) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        reloaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(reloaded.state_dict())

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("the model returned no loss: the batch has no labels / targets")
        for key, value in outputs.items() if model.training else ():  # evaluation logs only eval_loss
            if is_loss_term(key) and value is not None:
                self._parts[key].append(float(value.detach()))
        if model.training and outputs.get("logits_per_image") is not None:
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


def save_loss_curve(log_history: list[dict[str, Any]], path: Path, title: str = "training and held-out loss") -> Path | None:
    """A PNG of the training loss and the held-out loss (`eval_loss`) against the step, each loss term of a
    multi-loss model as a thin line; a linear y axis from 0, so the ticks read as plain numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for entry in log_history:
        for key, value in entry.items():
            if (key in ("loss", "eval_loss") or is_loss_term(key)) and "step" in entry and isinstance(value, (int, float)):
                series[key][0].append(entry["step"])
                series[key][1].append(value)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"loss": dict(label="training loss", color="tab:blue", linewidth=2),
              "eval_loss": dict(label="held-out loss", color="tab:orange", linewidth=2, marker="o", markersize=3)}
    order = [*styles, *sorted(k for k in series if k not in styles)]  # training, held-out, then the terms
    for key in (k for k in order if k in series):
        steps, values = series[key]
        ax.plot(steps, values, **styles.get(key, dict(label=key, linewidth=0.8, alpha=0.7)))
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1.08 * max(max(values) for _, values in series.values()))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
