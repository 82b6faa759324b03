"""Token-merging throughput on ViT-B/16 @ 224: plain transformers model vs ours at r=0, 16, (16, -1).

All variants run side by side in one process on the same weights: warm-up, then interleaved
repeats (plain, r=0, r=16, ... in turn, so drift on a shared machine hits all alike), median
time per variant. Prints images/s, measured speedup vs plain, the analytic MAC ratio (attention
4NC^2 + 2N^2C on the pre-merge N, MLP 8N'C^2 on the post-merge N'), measured / analytic, and the
r=0 overhead vs plain.

    python benchmarks/token_merging.py --batch-size 16 --dtype fp32 --device cpu --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, attn_implementation="sdpa")
    model = ViTModel(config, add_pooling_layer=False).to(device=device, dtype=dtype).eval()
    pixels = torch.randn(args.batch_size, 3, 224, 224, device=device, dtype=dtype)

    schedules: dict[str, int | tuple[int, int]] = {"ours r=0": 0, "ours r=16": 16, "ours r=(16,-1)": (16, -1)}
    towers = {name: TokenMergingVisionTower(model, TokenMergingConfig(r=r)) for name, r in schedules.items()}
    variants: dict[str, Callable[[], object]] = {"plain transformers": lambda: model(pixel_values=pixels)}
    for name, tower in towers.items():
        variants[name] = lambda tower=tower: tower(pixels)

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
    plain, plain_cpu = median["plain transformers"], cpu["plain transformers"]
    print(f"ViT-B/16 @224, batch {args.batch_size}, {args.dtype}, {device}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'variant':<20} {'tokens out':>10} {'img/s':>9} {'speedup':>8} {'analytic':>9} {'meas/anal':>10} "
          f"{'cpu-time speedup':>17}")
    for name, t in median.items():
        counts = towers[name].token_counts() if name in towers else [n0] * layers
        analytic = full / analytic_macs(n0, c, counts)
        speedup = plain / t
        print(f"{name:<20} {counts[-1]:>10} {args.batch_size / t:>9.1f} {speedup:>7.2f}x {analytic:>8.2f}x "
              f"{speedup / analytic:>10.3f} {plain_cpu / cpu[name]:>16.2f}x")
    analytic16 = full / analytic_macs(n0, c, towers["ours r=16"].token_counts())
    for clock, table in (("wall", median), ("cpu-time", cpu)):
        overhead = table["ours r=0"] / table["plain transformers"] - 1
        ratio16 = table["plain transformers"] / table["ours r=16"] / analytic16
        print(f"{clock:>8}: r=0 overhead vs plain {100 * overhead:+.1f}% (target within 3%), "
              f"r=16 measured/analytic {ratio16:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
