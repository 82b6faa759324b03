"""Write schema rows (by default the embedded shapes set) as WebDataset tar shards, img2dataset style.

Each sample ``<key>`` (a running 9-digit index) is ``<key>.png`` or ``<key>.jpg`` (the image), ``<key>.txt`` (its
captions, one a line) and ``<key>.json`` (every other schema field, ``image_id`` and ``captions`` included), so
`leanvlp.data.load_webdataset` reads the rows back exactly (PNG keeps the bytes; JPEG re-encodes).

    python scripts/write_shards.py --out shards --num-images 2000 --samples-per-shard 200
    python train.py --dataset webdataset --data_path 'shards/{00000..00009}.tar' --max_steps 300
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import PIL.Image

from leanvlp.data.schema import FEATURES, to_rgb


def _image_bytes(image: Any, image_format: str) -> bytes:
    """The stored bytes (PNG passes through untouched) or a JPEG re-encoding of the image."""
    if isinstance(image, Mapping):
        data = image.get("bytes")
        if data is None:
            data = Path(image["path"]).read_bytes()
        if image_format == "png" and data.startswith(b"\x89PNG"):
            return data
        image = PIL.Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="PNG" if image_format == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(rows: Iterable[Mapping[str, Any]], out: str | Path, samples_per_shard: int = 100,
                 image_format: str = "png") -> list[Path]:
    """Write `rows` (schema rows; images as PIL or ``{"bytes", "path"}``) to ``out/00000.tar, 00001.tar ...``.

    Returns the shard paths. `image_format` is "png" (lossless: rows round-trip exactly) or "jpg".
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format: 'png' or 'jpg', got {image_format!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: must be >= 1, got {samples_per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    tar: tarfile.TarFile | None = None
    now = time.time()
    for index, row in enumerate(rows):
        if index % samples_per_shard == 0:
            if tar is not None:
                tar.close()
            shards.append(out / f"{len(shards):05d}.tar")
            tar = tarfile.open(shards[-1], "w")
        key = f"{index:09d}"
        meta = {name: row[name] for name in FEATURES if name != "image" and name in row}
        _add(tar, f"{key}.{image_format}", _image_bytes(row["image"], image_format), now)
        _add(tar, f"{key}.txt", "\n".join(row["captions"]).encode(), now)
        _add(tar, f"{key}.json", json.dumps(meta).encode(), now)
    if tar is not None:
        tar.close()
    return shards


def main(argv: list[str] | None = None) -> None:
    from leanvlp.data.shapes import generate_shapes_row

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for 00000.tar, 00001.tar ...")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-index", type=int, default=0, help="first shapes index (disjoint splits)")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    args = parser.parse_args(argv)
    rows = (generate_shapes_row(i, args.seed, args.image_size)
            for i in range(args.start_index, args.start_index + args.num_images))
    shards = write_shards(rows, args.out, args.samples_per_shard, args.image_format)
    last = len(shards) - 1
    print(f"wrote {args.num_images} samples in {len(shards)} shards: '{args.out}/{{00000..{last:05d}}}.tar'")


if __name__ == "__main__":
    main()
