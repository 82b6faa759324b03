"""MergeBridge training-step time with bridge merging on vs off, side by side in one run.

One step = forward + backward + optimizer step (frozen vision tower and LLM, trainable bridge), on the same
weights: "off" is the same model with the bridge's merging set to r = 0, so the LLM then reads every vision
token. Beside the measured speedup it prints the FLOP ratio of the step, counted by
`torch.utils.flop_counter.FlopCounterMode` over the real forward and backward (frozen towers get no weight
gradients, so a formula would have to guess what the counter measures).

    python benchmarks/merge_bridge.py                       # reference shape: ViT-B/16 + 12-layer bridge + 12x768 LLM
    python benchmarks/merge_bridge.py --preset small        # a quick look
    python benchmarks/merge_bridge.py --device cuda --dtype bf16 --batch-size 32
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from leanvlp import MergeBridgeConfig, MergeBridgeForConditionalGeneration, TokenMergingConfig
from leanvlp.evaluation.speed import images_per_second
from leanvlp.training.arguments import parse_r

PRESETS = {
    # ViT-B/16 @224 (197 tokens) -> BERT-base-shaped bridge -> 12-layer, 768-wide Llama-style LLM
    "reference": dict(vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                  image_size=224, patch_size=16),
                      bridge=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                      llm=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                               intermediate_size=3072, vocab_size=32000)),
    "small": dict(vision=dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                              image_size=224, patch_size=16),
                  bridge=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024),
                  llm=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                           intermediate_size=1024, vocab_size=8000)),
}


def build(preset: str, r: str, mode: str) -> MergeBridgeForConditionalGeneration:
    shapes = PRESETS[preset]
    merging = dict(r=parse_r(r), mode=mode, prop_attn=mode == "size_weighted")
    config = MergeBridgeConfig(vision_config={"model_type": "vit", **shapes["vision"]},
                               text_config={"model_type": "llama", "max_position_embeddings": 512, **shapes["llm"]},
                               bridge_config=shapes["bridge"], bridge_merging=merging,
                               image_token_id=shapes["llm"]["vocab_size"] - 1)
    return MergeBridgeForConditionalGeneration(config)


def make_batch(model: MergeBridgeForConditionalGeneration, image_tokens: int, batch: int, text: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    cfg = model.config
    size = cfg.vision_config.image_size
    caption = torch.randint(1, cfg.image_token_id, (batch, text))
    ids = torch.cat([torch.full((batch, image_tokens), cfg.image_token_id), caption], dim=1)
    labels = torch.cat([torch.full((batch, image_tokens), -100), caption], dim=1)
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "pixel_values": torch.randn(batch, 3, size, size, device=device)}


def step(model, optimizer, batch, autocast) -> None:
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    parser.add_argument("--r", default="16", help="bridge merges per layer: '16', '16,-1' or a list")
    parser.add_argument("--mode", default="mean", choices=["mean", "size_weighted"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.preset, args.r, args.mode).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    merged = model.bridge.encoder.merging
    settings = {"merging off": TokenMergingConfig(r=0, protected=merged.protected), f"merging on (r={args.r})": merged}
    counts = {name: (cfg.token_counts(model.config.num_bridge_input_tokens, len(model.bridge.encoder.layers)) or
                     [model.config.num_bridge_input_tokens])[-1] for name, cfg in settings.items()}
    batches = {name: make_batch(model, counts[name], args.batch_size, args.text_tokens, device) for name in settings}
    use_bf16 = args.dtype == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731

    def use(name: str) -> None:
        """The bridge's merging, in the module and in the config (the model checks its inputs against the config)."""
        model.bridge.encoder.merging = settings[name]
        model.config.bridge_merging = settings[name].to_dict()

    flops = {}
    for name in settings:
        use(name)
        with FlopCounterMode(display=False) as counter:
            with autocast():
                loss = model(**batches[name]).loss
            loss.backward()
        optimizer.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops()

    def timed_step(name: str) -> Callable[[], None]:
        def run() -> None:
            use(name)
            step(model, optimizer, batches[name], autocast)
        return run

    # eval's timer: warm-up, then repeats interleaved (drift in machine load hits both settings alike), medians
    rates = images_per_second([timed_step(name) for name in settings], 1, device, args.warmup, args.repeats)
    off, on = settings
    median = {name: 1 / rate for name, rate in zip(settings, rates)}  # seconds per step
    print(f"MergeBridge training step, preset={args.preset}, batch={args.batch_size}, text={args.text_tokens} tokens, "
          f"{args.dtype} on {device}, torch threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"vision tokens {model.config.num_vision_tokens}; bridge merging {merged.to_dict()}")
    print(f"{'setting':<24}{'LLM visual tokens':>18}{'step ms':>10}{'GFLOP/step':>12}")
    for name in settings:
        print(f"{name:<24}{counts[name]:>18}{1000 * median[name]:>10.1f}{flops[name] / 1e9:>12.1f}")
    measured, analytic = median[off] / median[on], flops[off] / flops[on]
    print(f"measured speedup {measured:.2f}x   FLOP ratio {analytic:.2f}x   measured/FLOP ratio {measured / analytic:.2f}")


if __name__ == "__main__":
    main()
