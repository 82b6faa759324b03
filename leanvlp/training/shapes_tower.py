"""The embedded shapes tower: a tiny ViT pretrained on the shapes set with semantic heads, shipped in the package.

Why: the main job follows EVLGen / SimVLG: a *frozen pretrained* vision tower, a bridge and an LLM. With no
downloads, the pretrained tower has to come with leanvlp. Trained through the captioning loss alone, a tiny ViT does
not tell a star from a cross within the main job's 5 minutes (held-out object-mention F1 0.18); pretrained here, with
dense per-patch supervision (the semantic object-class head of Yang et al.) plus which shapes and colours each image
holds, the same kind of ViT names shapes on held-out images (shape-presence F1 ~0.9) and the main job only trains the
bridge and the LLM on top of it.

Recipe (deterministic: one CPU thread, fixed seeds): shapes images 0 .. 19,999 of seed 0 (the training range; the
held-out split starts at 1,000,000 and is never seen), a 3-layer, width-96 ViT (64 px, patch 8), AdamW 2e-3 with
200 warm-up steps and linear decay, batch 32, 4,000 steps. Losses: binary cross-entropy of "shape s / colour c is in
the image" from the max over patch tokens, plus 0.5 x the object-class head's cross-entropy on each patch's label
(the shape of the box covering most of it when that box covers at least a quarter of the patch, else background).
The heads are discarded; the tower is saved as an ordinary transformers ViT checkpoint with its image processor
and a `pretraining.json` record (recipe, held-out scores, CPU time).

    python -m leanvlp.training.shapes_tower --out leanvlp/pretrained/shapes-vit
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel

from ..data.pairs import decode_image
from ..data.shapes import COLOURS, SHAPES, make_shapes_dataset, make_shapes_held_out
from ..modeling.semantic_heads import ObjectClassHead
from ..processing.boxes import patch_overlap_fraction
from ..tiny import tiny_image_processor, tiny_vision_config

SHAPES_TOWER_DIR = Path(__file__).resolve().parent.parent / "pretrained" / "shapes-vit"
RECIPE = dict(image_size=64, patch_size=8, hidden_size=96, layers=3, heads=3, num_images=20000, seed=0,
              steps=4000, batch_size=32, lr=2e-3, warmup=200, weight_decay=0.01, dense_weight=0.5, min_cover=0.25)


def shapes_targets(rows: Any, image_size: int, patch_size: int, min_cover: float) -> dict[str, torch.Tensor]:
    """Pixels in [-1, 1] (the tiny image processor's normalisation), image-level presence of each shape and
    colour, and each patch's shape class (len(SHAPES) = background) from the boxes."""
    pixels, presence, patch_classes = [], [], []
    for row in rows:
        image = decode_image(row["image"], row["image_id"])
        if image.size != (image_size, image_size):
            raise ValueError(f"shapes tower: images must be {image_size} px, got {image.size}")
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
        present = torch.zeros(len(SHAPES) + len(COLOURS))
        for shape, attributes in zip(row["box_labels"], row["box_attributes"]):
            present[SHAPES.index(shape)] = 1
            present[len(SHAPES) + list(COLOURS).index(attributes[0])] = 1
        presence.append(present)
        boxes = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        cover = patch_overlap_fraction(boxes, image_size, image_size, patch_size)  # (M, P)
        labels = np.full(cover.shape[1], len(SHAPES))
        best = cover.argmax(0)
        hit = cover.max(0) >= min_cover
        labels[hit] = [SHAPES.index(row["box_labels"][m]) for m in best[hit]]
        patch_classes.append(torch.from_numpy(labels))
    return {"pixels": torch.stack(pixels), "presence": torch.stack(presence), "patch_classes": torch.stack(patch_classes)}


def presence_f1(predicted: torch.Tensor, present: torch.Tensor) -> dict[str, float]:
    """Micro F1 of the predicted shapes and of the predicted colours against those in each image."""
    def f1(p: torch.Tensor, t: torch.Tensor) -> float:
        hits = (p & t).sum().item()
        return 2 * hits / max(1, p.sum().item() + t.sum().item())

    s = len(SHAPES)
    return {"shape_f1": f1(predicted[:, :s], present[:, :s]), "colour_f1": f1(predicted[:, s:], present[:, s:])}


class ShapesPretraining(torch.nn.Module):
    """The tower plus its two pretraining heads (discarded after training)."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        super().__init__()
        config = tiny_vision_config(recipe["image_size"], recipe["patch_size"], recipe["hidden_size"],
                                    recipe["layers"], recipe["heads"])
        self.tower = AutoModel.from_config(config)
        self.presence = torch.nn.Linear(recipe["hidden_size"], len(SHAPES) + len(COLOURS))
        self.object_class = ObjectClassHead(recipe["hidden_size"], len(SHAPES))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.tower(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, P, C): CLS left out
        return self.presence(patches.max(1).values), patches  # (B, S + K) logits, (B, P, C)


@torch.no_grad()
def evaluate(model: ShapesPretraining, data: dict[str, torch.Tensor], batch_size: int = 250) -> dict[str, float]:
    model.eval()
    logits = torch.cat([model(data["pixels"][i:i + batch_size])[0] for i in range(0, len(data["pixels"]), batch_size)])
    model.train()
    return presence_f1(logits > 0, data["presence"] > 0.5)


def pretrain(out: str | Path, recipe: dict[str, Any] = RECIPE, num_eval_images: int = 500,
             progress: bool = True) -> dict[str, Any]:
    """Train the tower by the recipe, save it to `out` and return the record written to `pretraining.json`."""
    torch.set_num_threads(1)  # bit-reproducible on one machine kind, and the recipe's CPU time is one thread's
    size, patch = recipe["image_size"], recipe["patch_size"]
    train = shapes_targets(make_shapes_dataset(recipe["num_images"], image_size=size, seed=recipe["seed"]),
                           size, patch, recipe["min_cover"])
    held_out = shapes_targets(make_shapes_held_out(num_eval_images, image_size=size, seed=recipe["seed"]),
                              size, patch, recipe["min_cover"])
    torch.manual_seed(recipe["seed"])
    model = ShapesPretraining(recipe)
    steps, warmup = recipe["steps"], recipe["warmup"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps))
    order = torch.Generator().manual_seed(recipe["seed"])
    start = time.process_time()
    bar = tqdm(range(steps), desc="shapes tower", disable=not progress)
    for step in bar:
        idx = torch.randint(len(train["pixels"]), (recipe["batch_size"],), generator=order)
        logits, patches = model(train["pixels"][idx])
        loss = F.binary_cross_entropy_with_logits(logits, train["presence"][idx])
        loss = loss + recipe["dense_weight"] * model.object_class.loss(patches, train["patch_classes"][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    record = {"recipe": recipe, "held_out": {"images": num_eval_images, **evaluate(model, held_out)},
              "cpu_seconds": round(time.process_time() - start, 1), "torch": torch.__version__}
    out = Path(out)
    model.tower.save_pretrained(out)
    tiny_image_processor(size).save_pretrained(out)
    (out / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SHAPES_TOWER_DIR), help="folder to save the tower in")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"], help="training steps")
    parser.add_argument("--num_images", type=int, default=RECIPE["num_images"], help="training images")
    args = parser.parse_args(argv)
    record = pretrain(args.out, {**RECIPE, "steps": args.steps, "num_images": args.num_images})
    print(json.dumps(record["held_out"]), f"{record['cpu_seconds']} CPU s ->", args.out)


__all__ = ["RECIPE", "SHAPES_TOWER_DIR", "ShapesPretraining", "pretrain", "presence_f1", "shapes_targets"]

if __name__ == "__main__":
    main()
