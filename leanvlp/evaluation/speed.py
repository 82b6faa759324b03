"""Task speed: the family's technique on and off (and a `--sweep`), same weights: FLOPs per image, visual
tokens per stage, throughput and peak memory, and the speed-vs-quality plot.

Peak memory is the extra memory a call needs over the loaded model and its inputs. CUDA:
`torch.cuda.max_memory_allocated()` during the call minus the allocation before it. CPU (PyTorch keeps no CPU
allocator statistics): the peak total size of the tensor storages created inside the call that are alive at the
same time, tracked op by op with a TorchDispatchMode (`LiveTensorBytes`); kernel workspace that never becomes a
tensor is not seen.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm

from ..data.pairs import decode_image, task_rows
from .arguments import EvalArguments


MIB = 2**20


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any,
                out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch counts its CUDA attention kernels but not the CPU flash kernel that SDPA uses on CPU; give that one the
# same formula, so CPU and CUDA counts agree.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions and attention; a multiply-add counts 2)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


class LiveTensorBytes(TorchDispatchMode):
    """Peak total bytes of the tensor storages created inside the mode and alive at the same time.

    Every op's output storage that is new (not one of the op's inputs, so views and in-place results are not
    counted twice) is added when created and subtracted when freed (a finalizer on the storage). Weights and
    inputs that exist before the mode starts are not counted: this is the extra memory the call needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self._alive:
                continue
            self._alive.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Extra bytes one call of `fn` needs at its peak (see the module docstring for what is measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def memory_measure(device: torch.device) -> str:
    """One line saying what `peak_memory` measures on `device`."""
    if device.type == "cuda":
        return "CUDA max_memory_allocated during the call minus the allocation before it"
    return "peak bytes of tensors created during the call and alive at once (TorchDispatchMode; CPU)"


def timed_runs(calls: Sequence[Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
               progress: bool = False, desc: str = "timing") -> list[list[float]]:
    """Seconds of each of `repeats` timed runs of every call, after `warmup` untimed ones.

    The calls are timed in turns (A B A B ...), so a change in machine load hits all of them alike.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    bar = tqdm(total=(warmup + repeats) * len(calls), desc=desc, unit="call", disable=not progress)
    for _ in range(warmup):
        for call in calls:
            call()
            bar.update()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, timed in zip(calls, times):
            sync()
            start = time.perf_counter()
            call()
            sync()
            timed.append(time.perf_counter() - start)
            bar.update()
    bar.close()
    return times


def images_per_second(calls: Sequence[Callable[[], Any]], num_images: int, device: torch.device, warmup: int,
                      repeats: int) -> list[float]:
    """Throughput of each call: `num_images` / the median of `repeats` timed runs (see `timed_runs`)."""
    return [num_images / statistics.median(t) for t in timed_runs(calls, device, warmup, repeats)]


def ratio_warnings(off: dict[str, Any], on: dict[str, Any], kind: str, spread_limit: float = 0.2) -> list[str]:
    """Why the on/off throughput ratio of `kind` may not be trusted: min-max ranges of the two settings that
    overlap (the ratio could be either side of what the medians say), or a spread above `spread_limit` of the
    median in either setting."""
    warnings = []
    key = f"{kind}_images_per_s"
    low, high = on[f"{key}_min"] / off[f"{key}_max"], on[f"{key}_max"] / off[f"{key}_min"]
    if low < 1.0 < high:
        warnings.append(f"{kind}: the on/off ratio ranges {low:.2f}x-{high:.2f}x over the repeats, so it may be "
                        "either side of 1; rerun on a quieter machine or with more --repeats")
    for name, setting in (("off", off), ("on", on)):
        spread = (setting[f"{key}_max"] - setting[f"{key}_min"]) / setting[key]
        if spread > spread_limit:
            warnings.append(f"{kind}: throughput with the technique {name} varies by {spread:.0%} of its median "
                            f"between repeats (more than {spread_limit:.0%})")
    return warnings


def load_warning() -> str | None:
    """A line when the machine's 1-minute load is above its CPU count (other work competes for the cores)."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None
    cpus = os.cpu_count() or 1
    if load > cpus:
        return f"machine load {load:.1f} on {cpus} CPUs while timing: other processes competed for the cores"
    return None


def measure_setting(ev: Any, batch: dict[str, Any], num_images: int, args: EvalArguments,
                    memory: bool = True) -> dict[str, Any]:
    """Visual tokens, FLOPs per image (and peak memory of generation) in the evaluator's current setting."""
    with torch.no_grad():
        out = {"tokens": ev.measured_tokens(batch),
               "encode_flops": count_flops(lambda: ev.encode(batch)) // num_images,
               "forward_flops": count_flops(lambda: ev.forward(batch)) // num_images}
        if memory:
            out["peak_memory_bytes"] = peak_memory(lambda: ev.generate(batch, args.max_new_tokens, args.num_beams),
                                                   torch.device(args.device))
    return out


def time_settings(ev: Any, setups: Sequence[tuple[Any, dict[str, Any]]], num_images: int, args: EvalArguments,
                  kinds: Sequence[str] = ("encode", "generate")) -> list[dict[str, float]]:
    """Images/s of `encode` and `generate` for each (knob value, batch), all settings timed in turns."""

    def call(value: Any, batch: dict[str, Any], kind: str) -> Callable[[], Any]:
        def run() -> Any:
            with ev.setting(value):
                if kind == "encode":
                    return ev.encode(batch)
                return ev.generate(batch, args.max_new_tokens, args.num_beams)
        return run

    out: list[dict[str, float]] = [{} for _ in setups]
    with torch.no_grad():
        for kind in kinds:
            times = timed_runs([call(v, b, kind) for v, b in setups], torch.device(args.device), args.warmup,
                               args.repeats, args.progress, f"timing {kind}")
            for result, timed in zip(out, times):
                result[f"{kind}_images_per_s"] = num_images / statistics.median(timed)
                result[f"{kind}_images_per_s_min"] = num_images / max(timed)
                result[f"{kind}_images_per_s_max"] = num_images / min(timed)
    return out


def _speed_row(ev: Any, label: str, m: dict[str, Any]) -> dict[str, Any]:
    """One row of the speed table (the card shows these)."""
    row = {"setting": label, **ev.token_columns(m["tokens"]),
           "encode GFLOPs/img": m["encode_flops"] / 1e9, "caption fwd GFLOPs/img": m["forward_flops"] / 1e9}
    for kind in ("encode", "generate"):
        if f"{kind}_images_per_s" in m:
            row[f"{kind} img/s (median)"] = m[f"{kind}_images_per_s"]
            row[f"{kind} img/s min-max"] = f"{m[f'{kind}_images_per_s_min']:.4g}-{m[f'{kind}_images_per_s_max']:.4g}"
    if "peak_memory_bytes" in m:
        row["peak MiB (generate)"] = m["peak_memory_bytes"] / MIB
    return row


def _speed_inputs(data: Dataset, args: EvalArguments) -> tuple[list[PIL.Image.Image], list[str]]:
    """The timed batch: the first `batch_size` images with their first captions."""
    rows = task_rows(data, "caption")
    rows = rows.select(range(min(args.batch_size, len(rows))))
    return [decode_image(r["image"], r["image_id"]) for r in rows], list(rows["target"])


def run_speed(ev: Any, data: Dataset, args: EvalArguments) -> dict[str, Any]:
    """The speed entry of eval_results.json: technique off vs on, same weights, same batch, timed in turns."""
    images, captions = _speed_inputs(data, args)
    settings, setups = [], []
    for label, value in ev.settings():
        with ev.setting(value):
            batch = ev.batch(images, captions)
            measured = measure_setting(ev, batch, len(images), args)
            settings.append({"setting": label, ev.knob: ev.knob_value(), **measured,
                             "derived_tokens": ev.derived_tokens()})
            setups.append((value, batch))
    for setting, rates in zip(settings, time_settings(ev, setups, len(images), args)):
        setting.update(rates)
    off, on = settings
    metrics = {
        "speedup_generate": on["generate_images_per_s"] / off["generate_images_per_s"],
        "speedup_generate_min": on["generate_images_per_s_min"] / off["generate_images_per_s_max"],
        "speedup_generate_max": on["generate_images_per_s_max"] / off["generate_images_per_s_min"],
        "speedup_encode": on["encode_images_per_s"] / off["encode_images_per_s"],
        "flops_reduction_encode": off["encode_flops"] / on["encode_flops"],
        "flops_reduction_forward": off["forward_flops"] / on["forward_flops"],
        "llm_prefix_tokens_off": off["tokens"]["llm_prefix"],
        "llm_prefix_tokens_on": on["tokens"]["llm_prefix"],
    }
    warnings = [*ratio_warnings(off, on, "generate"), *ratio_warnings(off, on, "encode")]
    if args.device == "cpu" and (line := load_warning()):
        warnings.append(line)
    return {"metrics": metrics, "warnings": warnings, "repeats": args.repeats,
            "rows": [_speed_row(ev, s["setting"], s) for s in settings], "settings": settings,
            "batch_images": len(images), "memory_measure": memory_measure(torch.device(args.device)),
            "device": args.device, "dtype": args.dtype}


def run_sweep(ev: Any, data: Dataset, args: EvalArguments, plot_path: Path) -> dict[str, Any]:
    """Speed and caption CIDEr-D for every knob value in `--sweep`, and the speed-vs-quality PNG."""
    images, captions = _speed_inputs(data, args)
    rows = task_rows(data, "caption")
    points, setups = [], []
    for value in tqdm(args.sweep_values, desc=f"sweep {ev.knob}", disable=not args.progress):
        with ev.setting(value):
            batch = ev.batch(images, captions)
            measured = measure_setting(ev, batch, len(images), args, memory=False)
            quality = ev.generate_report(rows, "caption", dataclasses.replace(args, progress=False))
        points.append({ev.knob: value, **measured, "cider": quality["cider"]})
        setups.append((value, batch))
    for point, rates in zip(points, time_settings(ev, setups, len(images), args, kinds=("generate",))):
        point.update(rates)
    save_speed_quality_plot(points, ev.knob, plot_path)
    table = [{**_speed_row(ev, f"sweep {ev.knob}={p[ev.knob]}", p), "CIDEr-D": p["cider"]} for p in points]
    return {"kind": "sweep", "metrics": {}, "rows": table, "sweep": points, "plot": plot_path.name}


def save_speed_quality_plot(points: list[dict[str, Any]], knob: str, path: Path) -> Path:
    """CIDEr-D against generation throughput and against FLOPs per caption forward, one labelled point per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    cider = [p["cider"] for p in points]
    for ax, key, label in ((axes[0], "generate_images_per_s", "captions / s (generate)"),
                           (axes[1], "forward_flops", "GFLOPs per image (caption forward)")):
        xs = [p[key] / (1e9 if key.endswith("flops") else 1) for p in points]
        ax.plot(xs, cider, "o-")
        for x, y, p in zip(xs, cider, points):
            ax.annotate(f"{knob}={p[knob]}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("CIDEr-D")
        ax.grid(alpha=0.3)
    fig.suptitle("speed vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
