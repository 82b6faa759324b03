"""One side of the cross-version checkpoint test, run in a fresh process (see test_cross_version.py).

    python cross_version_worker.py save OUT [--transformers-dir D]
    python cross_version_worker.py load OUT remote|installed [--transformers-dir D]

`--transformers-dir` puts another transformers release (a `pip install --no-deps --target D` folder) first
on the path, so one venv can run either release. `save` builds a tiny MergeBridge and a tiny PatchAlign with
leanvlp and writes each with its processor, one batch and the outputs. `load remote` blocks leanvlp and loads
through `trust_remote_code=True` (the code saved with the checkpoint); `load installed` imports leanvlp and
loads with no `trust_remote_code`. Both recompute the outputs and fail unless they are bit-identical.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# name -> (Auto class that loads it, output fields compared)
FAMILIES = {
    "merge_bridge": ("AutoModelForImageTextToText", ("logits",)),
    "patch_align": ("AutoModelForPreTraining", ("loss", "logits_per_image", "itm_logits", "patch_scores",
                                                "kept_patches")),
}


def _outputs(model, batch: dict, fields: tuple[str, ...]) -> dict:
    import torch

    torch.manual_seed(0)  # PatchAlign draws its ITM negatives and MLM masks
    with torch.no_grad():
        out = model(**batch)
    return {name: out[name] for name in fields}


def save(out_dir: Path) -> None:
    import torch
    import transformers

    sys.path.insert(0, str(TESTS))
    import test_merge_bridge as mb
    import test_patch_align as pa

    from leanvlp.data.shapes import make_shapes_dataset
    from leanvlp.tiny import build_word_tokenizer

    tokenizer = build_word_tokenizer(mb.CORPUS)
    model = mb.make_model(tokenizer, bridge_merging={"r": 3, "mode": "size_weighted", "prop_attn": True})
    processor = mb.make_processor(tokenizer, model.config)
    batches = {"merge_bridge": (model, processor, dict(processor(images=mb.images(2),
                                                               text=["", "question: what colour?"])))}
    vocab = out_dir / "vocab.txt"
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(pa.VOCAB))
    torch.manual_seed(0)
    model = pa.PatchAlignForPreTraining(pa.tiny_config(semantic_heads=pa.ALL_HEADS)).eval()
    processor = pa._processor(pa.BertTokenizer(str(vocab)))
    ds = make_shapes_dataset(2, image_size=64)
    batches["patch_align"] = (model, processor, dict(processor(
        images=ds["image"], text=[c[0] for c in ds["captions"]], boxes=ds["boxes"], box_labels=ds["box_labels"],
        box_attributes=ds["box_attributes"])))
    for name, (model, processor, batch) in batches.items():
        folder = out_dir / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        torch.save({"batch": batch, "expected": _outputs(model, batch, FAMILIES[name][1]),
                    "transformers": transformers.__version__}, folder / "reference.pt")
    print("saved with transformers", transformers.__version__)


def load(out_dir: Path, mode: str) -> None:
    if mode == "remote":
        # leanvlp is installed editable: drop its finder and the repo from the path, then prove it is gone
        sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        sys.path = [p for p in sys.path if p and os.path.realpath(p) != str(REPO)]
        try:
            import leanvlp  # noqa: F401

            raise SystemExit("leanvlp is importable in the remote-code process")
        except ImportError:
            sys.modules["leanvlp"] = None
    else:
        import leanvlp  # noqa: F401  (registers the Auto classes)
    import torch
    import transformers

    for name, (auto_name, fields) in FAMILIES.items():
        folder = out_dir / name
        reference = torch.load(folder / "reference.pt", weights_only=True)
        kwargs = {"trust_remote_code": True} if mode == "remote" else {}
        model = getattr(transformers, auto_name).from_pretrained(folder, **kwargs).eval()
        expected_module = "transformers_modules" if mode == "remote" else "leanvlp."
        if not type(model).__module__.startswith(expected_module):
            raise SystemExit(f"{name}: loaded {type(model).__module__}, expected {expected_module}*")
        transformers.AutoProcessor.from_pretrained(folder, **kwargs)
        got = _outputs(model, reference["batch"], fields)
        for field in fields:
            if not torch.equal(got[field], reference["expected"][field]):
                diff = (got[field].double() - reference["expected"][field].double()).abs().max()
                raise SystemExit(f"{name}.{field} differs (max abs diff {float(diff):.3g}) between transformers "
                                 f"{reference['transformers']} (saved) and {transformers.__version__} ({mode})")
        print(f"{name}: saved with transformers {reference['transformers']}, loaded with "
              f"{transformers.__version__} ({mode}): {', '.join(fields)} identical")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("save", "load"))
    parser.add_argument("out", type=Path)
    parser.add_argument("mode", nargs="?", choices=("remote", "installed"))
    parser.add_argument("--transformers-dir", default=None)
    args = parser.parse_args()
    if args.transformers_dir:
        sys.path.insert(0, args.transformers_dir)
    if args.command == "save":
        save(args.out)
    else:
        load(args.out, args.mode)


if __name__ == "__main__":
    main()
