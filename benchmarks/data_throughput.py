"""Images per second from WebDataset shards (read + decode + processor + collate) vs the model's training rate.

Side by side in one run, one thread each, at two shapes:

- tiny: the `train.py` default (64 px, 8 px patches, tiny MergeBridge, LLM trained), shards of 64 px images;
- reference: ViT-B/16 at 224 px + 12 x 768 bridge + 12 x 768 LLM (frozen vision tower and LLM, as in
  `benchmarks/merge_bridge.py`; heads and vocabulary from the word tokenizer of the tiny recipe), shards of 256 px
  images resized by a ViT image processor to 224.

The data path is one DataLoader worker's work (`num_workers=0` here, so it runs in this thread): it scales with
`--dataloader_num_workers` until the cores are used up. Its rate is also split into stages (tar read + JSON +
header check; + image decode) to say what limits it.

    python benchmarks/data_throughput.py                     # both shapes
    python benchmarks/data_throughput.py --shapes tiny --repeats 5
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from write_shards import write_shards  # noqa: E402

from leanvlp.data.shapes import generate_shapes_row  # noqa: E402
from leanvlp.data.webdataset import WebDatasetStream, load_webdataset  # noqa: E402

SHAPES = {  # ModelArguments overrides, shard image size, batch size
    "tiny": (dict(), 64, 32),
    "reference": (dict(tiny_image_size=224, tiny_patch_size=16, tiny_vision_hidden=768, tiny_vision_layers=12,
                       tiny_llm_hidden=768, tiny_llm_layers=12, bridge_hidden=768, bridge_layers=12, freeze_llm=True),
                  256, 8),
}


class FirstCaption:
    """One training pair per image (its first caption), in the row form the collators read."""

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"image": row["image"], "image_id": row["image_id"], "question": "", "target": row["captions"][0],
                 "references": row["captions"]}]


def build(shape: str, corpus: list[str]) -> tuple[Any, Any]:
    """Model and processor as `train.py` builds them from scratch (2 attention heads a layer: same FLOPs)."""
    from leanvlp.training import ModelArguments, build_merge_bridge

    return build_merge_bridge(ModelArguments(**SHAPES[shape][0]), corpus)


def timed(fn: Any, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def rate(images: int, seconds: list[float]) -> str:
    per = sorted(images / s for s in seconds)
    return f"{per[0]:8.3g} {statistics.median(per):8.3g} {per[-1]:8.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,reference")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--shuffle-buffer", type=int, default=100)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed repeat of the data path")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from leanvlp.training import MergeBridgeCollator

    print(f"1 thread, {args.image_format} shards, shuffle buffer {args.shuffle_buffer}; images/s min median max")
    for shape in args.shapes.split(","):
        _, pixels, batch_size = SHAPES[shape]
        with tempfile.TemporaryDirectory() as tmp:
            rows = [generate_shapes_row(i, 0, pixels) for i in range(args.num_images)]
            corpus = [c for r in rows for c in r["captions"]]
            write_shards(rows, tmp, samples_per_shard=64, image_format=args.image_format)
            torch.manual_seed(0)
            model, processor = build(shape, corpus)
            collator = MergeBridgeCollator(processor, "caption")
            stream: WebDatasetStream = load_webdataset(f"{tmp}/*.tar", shuffle_buffer=args.shuffle_buffer)
            pairs = iter(DataLoader(stream.flat_map(FirstCaption()), batch_size=batch_size, collate_fn=collator))
            rows_only = iter(DataLoader(stream, batch_size=batch_size, collate_fn=list))
            n = args.batches * batch_size

            def read() -> None:
                for _ in range(args.batches):
                    next(rows_only)

            def read_decode() -> None:
                for _ in range(args.batches):
                    for row in next(rows_only):
                        PIL.Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")

            def full() -> None:
                for _ in range(args.batches):
                    next(pairs)

            batch = next(pairs)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4)
            model.train()

            def train_step() -> None:
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            results = {
                "data: read tar + JSON + header check": (n, timed(read, args.repeats)),
                "data: + decode": (n, timed(read_decode, args.repeats)),
                "data: + processor + collate (full)": (n, timed(full, args.repeats)),
                "model: training step": (batch_size, timed(train_step, args.repeats)),
            }
            print(f"\n{shape}: {pixels} px shards -> {batch['pixel_values'].shape[-1]} px, batch {batch_size}, "
                  f"{sum(p.numel() for p in trainable) / 1e6:.1f}M trainable parameters")
            for name, (images, seconds) in results.items():
                print(f"  {name:40s} {rate(images, seconds)}")
            data = statistics.median(n / s for s in results["data: + processor + collate (full)"][1])
            model_rate = statistics.median(batch_size / s for s in results["model: training step"][1])
            print(f"  data / model (medians): {data / model_rate:.3g}x per thread")


if __name__ == "__main__":
    main()
