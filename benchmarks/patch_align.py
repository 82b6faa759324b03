"""PatchAlign throughput: the ViT-B/16 tower with COPA's detector after block 6 vs no pruning, and a full
pretraining step (forward + backward, all losses) with the detector on vs off.

Tower: plain transformers ViTModel, our tower without pruning, and the text-aware detector after block 6 at
keep 0.7 / 0.5 / 0.3 (a random text [CLS] stands in for the text encoder), side by side on the same
weights, interleaved repeats, median. The analytic ratio counts a block as 4NC^2 + 2N^2C (attention) +
8NC^2 (MLP) on its own N: blocks 1..6 on 197 tokens, 7..12 on K + 2 (1.18x / 1.34x / 1.54x).

Pretraining step: the pruned step runs blocks 7..12 on 2B x (K + 2) tokens (text-agnostic branch for
ITC/ITM/LM and text-aware branch for MLM, stacked), so the tower saves little there; the savings are in the
fusion layers' cross-attention over K + 2 instead of 197 image tokens for MLM.

    python benchmarks/patch_align.py --batch-size 8 --repeats 5 [--step-batch-size 4 --step-size small]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import ViTConfig, ViTModel

from leanvlp.modeling.configuration_patch_align import PatchAlignConfig
from leanvlp.modeling.modeling_patch_align import PatchAlignForPreTraining
from leanvlp.modeling.patch_selection import PatchSelectionHook, TextAwarePatchDetector, num_kept_patches
from leanvlp.modeling.vision_tower import TokenMergingVisionTower

STEP_SIZES = {
    # ViT-S/16-shaped tower + a 4-layer 384-wide BERT: a CPU-affordable stand-in for the base model
    "small": dict(vision=dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
                  text=dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_hidden_layers=4)),
    "base": dict(vision=dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
                 text=dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=6)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench(
    variants: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) per variant over interleaved repeats.

    CPU time is robust to other load on a shared CPU; on a GPU only the wall clock means anything.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start, time.process_time() - cpu_start))
    return {
        name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()
    }


def analytic_ratio(n0: int, c: int, layers: int, k_layer: int, kept_tokens: int) -> float:
    def block(n: int) -> float:
        return 4 * n * c * c + 2 * n * n * c + 8 * n * c * c

    pruned = k_layer * block(n0) + (layers - k_layer) * block(kept_tokens)
    return layers * block(n0) / pruned


def tower_table(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, attn_implementation="sdpa")
    model = ViTModel(config, add_pooling_layer=False).to(device).eval()
    tower = TokenMergingVisionTower(model)
    detector = TextAwarePatchDetector(768, 768).to(device).eval()
    pixels = torch.randn(args.batch_size, 3, 224, 224, device=device)
    text = torch.randn(args.batch_size, 768, device=device)
    variants: dict[str, Callable[[], object]] = {
        "plain transformers": lambda: model(pixel_values=pixels),
        "ours, no pruning": lambda: tower(pixels),
    }
    for keep in args.keep_ratios:
        variants[f"detector@6 keep {keep}"] = lambda keep=keep: tower(
            pixels, hooks=[PatchSelectionHook(5, keep, detector, text=text)]
        )
    with torch.inference_mode():
        median = _bench(variants, args.warmup, args.repeats, device)
    plain, plain_cpu = median["plain transformers"]
    print(f"\nViT-B/16 @224 tower, batch {args.batch_size}, fp32, {device}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'variant':<22} {'tokens 7-12':>11} {'img/s':>8} {'speedup':>8} {'analytic':>9} {'meas/anal':>10} "
          f"{'cpu-time speedup':>17} {'cpu meas/anal':>14}")
    for name, (t, cpu) in median.items():
        if name.startswith("detector"):
            keep = float(name.split()[-1])
            tokens = num_kept_patches(196, keep) + 2
            analytic = analytic_ratio(197, 768, 12, 6, tokens)
        else:
            tokens, analytic = 197, 1.0
        speedup = plain / t
        cpu_speedup = plain_cpu / cpu
        print(f"{name:<22} {tokens:>11} {args.batch_size / t:>8.2f} {speedup:>7.2f}x {analytic:>8.2f}x "
              f"{speedup / analytic:>10.3f} {cpu_speedup:>16.2f}x {cpu_speedup / analytic:>14.3f}")


def step_table(args: argparse.Namespace, device: torch.device) -> None:
    size = STEP_SIZES[args.step_size]
    steps: dict[str, Callable[[], object]] = {}
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.step_batch_size, 3, 224, 224, generator=g).to(device)
    ids = torch.randint(1000, 20000, (args.step_batch_size, 30), generator=g).to(device)
    ids[:, 0], ids[:, -1] = 101, 102
    labels = (torch.rand(args.step_batch_size, 196, generator=g) > 0.7).float().to(device)
    for name, enabled in (("detector off", False), ("detector@6 keep 0.5", True)):
        torch.manual_seed(0)
        config = PatchAlignConfig(
            vision_config=dict(model_type="vit", num_hidden_layers=12, image_size=224, patch_size=16, **size["vision"]),
            text_config=dict(model_type="bert", **size["text"]),
            num_fusion_layers=2, num_decoder_layers=2,
            patch_detector=dict(enabled=enabled, layer=6, keep_ratio=0.5),
        )
        model = PatchAlignForPreTraining(config).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model: PatchAlignForPreTraining = model, opt: torch.optim.Optimizer = opt) -> None:
            out = model(pixels, ids, patch_labels=labels)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        steps[name] = step
    results = _bench(steps, args.warmup, args.repeats, device)  # interleaved, like the tower table
    base, base_cpu = results["detector off"]
    print(f"\nPretraining step (fwd + bwd + AdamW, ITC/ITM/MLM/LM/PTA), {args.step_size} model, batch "
          f"{args.step_batch_size}, {device}")
    print(f"{'variant':<22} {'s/step':>8} {'speedup':>8} {'cpu-time speedup':>17}")
    for name, (t, cpu) in results.items():
        print(f"{name:<22} {t:>8.3f} {base / t:>7.2f}x {base_cpu / cpu:>16.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    parser.add_argument("--step-batch-size", type=int, default=4)
    parser.add_argument("--step-size", choices=sorted(STEP_SIZES), default="small")
    parser.add_argument("--skip-step", action="store_true", help="only the tower table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if min(args.batch_size, args.step_batch_size, args.repeats) < 1 or args.warmup < 0:
        parser.error("batch sizes and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tower_table(args, device)
    if not args.skip_step:
        step_table(args, device)


if __name__ == "__main__":
    main()
