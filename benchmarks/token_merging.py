"""Token-merging throughput on ViT-B/16 @ 224: plain transformers model vs ours at r=0, 16, (16, -1).

All variants run side by side in one process on the same weights: warm-up, then interleaved
repeats (plain, r=0, r=16, ... in turn, so drift on a shared machine hits all alike). Prints images/s
(from the median), min / median / max time, measured speedup vs plain, the analytic MAC ratio
(attention 4NC^2 + 2N^2C on the pre-merge N, MLP 8N'C^2 on the post-merge N'), measured / analytic,
and the r=0 overhead vs plain.

    python benchmarks/token_merging.py --batch-size 16 --dtype fp32 --device cpu --repeats 7
    python benchmarks/token_merging.py --compile        # also plain and ours, each torch.compile'd (inductor)
    python benchmarks/token_merging.py --memory         # peak training memory of an unfrozen tower, +/- checkpointing
    python benchmarks/token_merging.py --attn flex_attention --device cuda --dtype bf16   # any backend

--memory runs one training step (forward + backward of the unfrozen tower at r=16) per fresh subprocess,
interleaving the settings, and reports the process's peak resident memory above its memory before the step
(on CUDA: torch.cuda.max_memory_allocated above the memory before the step).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from transformers import ViTConfig, ViTModel

from leanvlp.modeling.token_merging import TokenMergingConfig, analytic_macs
from leanvlp.modeling.vision_tower import TokenMergingVisionTower

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds); CPU time is robust to other load on a shared CPU."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def _vit_b16(attn: str) -> tuple[ViTConfig, ViTModel]:
    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, attn_implementation=attn)
    return config, ViTModel(config, add_pooling_layer=False)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_step(args: argparse.Namespace) -> None:
    """One training step of the unfrozen tower in this process; prints the peak memory it added (JSON)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    _, model = _vit_b16(args.attn)
    model = model.to(device=device, dtype=dtype).train()
    if args.checkpointing:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    tower = TokenMergingVisionTower(model, TokenMergingConfig(r=16))
    pixels = torch.randn(args.batch_size, 3, 224, 224, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_bytes()
    start = time.perf_counter()
    tower(pixels).last_hidden_state.float().square().mean().backward()
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is in KiB
    print(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def memory(args: argparse.Namespace) -> None:
    results: dict[str, list[dict]] = {"no checkpointing": [], "checkpointing": []}
    base = [sys.executable, __file__, "--memory-step", "--batch-size", str(args.batch_size), "--dtype", args.dtype,
            "--device", args.device, "--attn", args.attn, "--threads", str(args.threads or torch.get_num_threads())]
    for _ in range(args.repeats):
        for name in results:
            cmd = base + (["--checkpointing"] if name == "checkpointing" else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"ViT-B/16 @224 tower at r=16, unfrozen, one training step, batch {args.batch_size}, {args.dtype}, "
          f"{args.device}, attn {args.attn}; {args.repeats} fresh processes per setting, interleaved")
    print(f"{'setting':<18} {'peak MiB min / median / max':>30} {'step s min / median / max':>28}")
    for name, runs in results.items():
        mib = sorted(r["peak_bytes"] / 2**20 for r in runs)
        sec = sorted(r["seconds"] for r in runs)
        print(f"{name:<18} {mib[0]:>10.0f} / {statistics.median(mib):>6.0f} / {mib[-1]:>6.0f} "
              f"{sec[0]:>10.2f} / {statistics.median(sec):>5.2f} / {sec[-1]:>5.2f}")
    ratio = (statistics.median(r["peak_bytes"] for r in results["checkpointing"])
             / statistics.median(r["peak_bytes"] for r in results["no checkpointing"]))
    print(f"checkpointing / no checkpointing peak memory (medians): {ratio:.2f}")


def throughput(args: argparse.Namespace) -> None:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config, model = _vit_b16(args.attn)
    model = model.to(device=device, dtype=dtype).eval()
    pixels = torch.randn(args.batch_size, 3, 224, 224, device=device, dtype=dtype)

    schedules: dict[str, int | tuple[int, int]] = {"ours r=0": 0, "ours r=16": 16, "ours r=(16,-1)": (16, -1)}
    towers = {name: TokenMergingVisionTower(model, TokenMergingConfig(r=r)) for name, r in schedules.items()}
    variants: dict[str, Callable[[], object]] = {"plain transformers": lambda: model(pixel_values=pixels)}
    for name, tower in towers.items():
        variants[name] = lambda tower=tower: tower(pixels)
    token_counts = {name: towers[name].token_counts() for name in towers}
    if args.compile:
        compiled_plain = torch.compile(model)
        variants["plain, compiled"] = lambda: compiled_plain(pixel_values=pixels)
        for name in ("ours r=0", "ours r=16"):
            compiled = torch.compile(towers[name], fullgraph=True)
            variants[f"{name}, compiled"] = lambda compiled=compiled: compiled(pixels)
            token_counts[f"{name}, compiled"] = token_counts[name]

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(_time_once(fn, device))

    n0, c, layers = 197, config.hidden_size, config.num_hidden_layers
    full = analytic_macs(n0, c, [n0] * layers)
    median = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    print(f"ViT-B/16 @224, batch {args.batch_size}, {args.dtype}, {device}, attn {args.attn}, threads "
          f"{torch.get_num_threads()}, {args.repeats} interleaved repeats")
    print(f"{'variant':<24} {'tokens out':>10} {'img/s':>7} {'ms min / median / max':>24} {'speedup':>8} "
          f"{'analytic':>9} {'meas/anal':>10} {'cpu-time speedup':>17}")
    for name, t in median.items():
        baseline = "plain, compiled" if name.endswith("compiled") else "plain transformers"
        counts = token_counts.get(name, [n0] * layers)
        analytic = full / analytic_macs(n0, c, counts)
        speedup = median[baseline] / t
        walls = sorted(1000 * w for w, _ in times[name])
        print(f"{name:<24} {counts[-1]:>10} {args.batch_size / t:>7.1f} {walls[0]:>8.0f} / {1000 * t:>5.0f} / "
              f"{walls[-1]:>5.0f} {speedup:>7.2f}x {analytic:>8.2f}x {speedup / analytic:>10.3f} "
              f"{cpu[baseline] / cpu[name]:>16.2f}x")
    analytic16 = full / analytic_macs(n0, c, token_counts["ours r=16"])
    modes = [("eager mode", "plain transformers", "ours r=0", "ours r=16")]
    if args.compile:
        modes.append(("compiled", "plain, compiled", "ours r=0, compiled", "ours r=16, compiled"))
    for mode, plain_name, r0_name, r16_name in modes:
        for clock, table in (("wall", median), ("cpu-time", cpu)):
            overhead = table[r0_name] / table[plain_name] - 1
            ratio16 = table[plain_name] / table[r16_name] / analytic16
            print(f"{mode:>10} {clock:>8}: r=0 overhead vs plain {100 * overhead:+.1f}% (target within 3%), "
                  f"r=16 speedup {table[plain_name] / table[r16_name]:.2f}x, measured/analytic {ratio16:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation: eager, sdpa, flex_attention, ...")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd plain and merged models")
    parser.add_argument("--memory", action="store_true", help="peak training memory with and without checkpointing")
    parser.add_argument("--memory-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_step:
        memory_step(args)
    elif args.memory:
        memory(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
