"""Stream WebDataset / img2dataset tar shards as leanvlp schema rows: split, shuffled, resumable mid-epoch.

A shard is a tar file whose members are grouped into samples by key (the member name up to the first dot of its
base name): ``000000012.jpg`` / ``.png`` / ``.webp`` (the image), ``000000012.txt`` (captions, one a line) and
``000000012.json`` (metadata). The JSON may hold any schema field (``image_id``, ``captions``, ``boxes``,
``box_labels``, ``box_attributes``, ``box_features``, ``questions``, ``answers``) and img2dataset's ``caption``;
other keys (``url``, ``status``, ``width`` ...) are ignored. Captions come from JSON ``captions``, else the
``.txt`` lines, else JSON ``caption``; ``image_id`` from JSON, else the tar key. Rows carry the image as
undecoded ``{"bytes", "path"}`` (like ``to_pairs``; the collator decodes it).

Why not only ``datasets.load_dataset("webdataset", streaming=True)``: its ``state_dict()`` drops the shuffle
buffer (it warns and refills it on resume, so a resumed run sees other samples), a bad ``.json`` member raises
from inside its generator and ends the stream (no per-sample skip), and its state is per process only without
torchdata's StatefulDataLoader (which Trainer does not checkpoint). So this module reads the tars itself.

Order (deterministic for a seed): in epoch ``e`` the shard list is permuted by ``rng(seed, e)``; the
``num_processes x num_workers`` readers ("slots") take every S-th shard (or, with fewer shards than slots,
every S-th sample); each slot shuffles through a buffer of ``shuffle_buffer`` samples with ``rng(seed, e, slot)``.
The DataLoader takes batch ``k`` from worker ``k % num_workers``.

Resume (no replay of the model, no shared memory): a slot's stream is a pure function of its configuration, so
its position is a count of the items it has yielded. The count is derived from the number of batches the
trainer consumed (``advance``), saved per process by ``WebDatasetStateCallback`` into
``checkpoint-N/webdataset_state/process_<i>.json`` and restored before the workers start. Restoring re-reads
every sample the slot consumed since the run began, without decoding images (tar bytes + JSON + image header:
the "read" stage of benchmarks/data_throughput.py, ~1-3k samples/s per worker), and rotates the worker-to-slot
map so batches keep their uninterrupted order.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import itertools
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import TrainerCallback
from transformers.utils import logging

from .schema import FEATURES, validate_row

__all__ = [
    "BadSampleError",
    "IMAGE_EXTENSIONS",
    "STATE_DIR",
    "WebDatasetStateCallback",
    "WebDatasetStream",
    "expand_shards",
    "load_webdataset",
    "webdataset_dataloader",
]

logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
STATE_DIR = "webdataset_state"
STATE_FORMAT = "leanvlp.webdataset/1"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


class BadSampleError(ValueError):
    """A sample (or a whole shard) that cannot be read; names the shard and the key."""

    def __init__(self, shard: str, key: str, why: str) -> None:
        super().__init__(f"bad sample in shard {shard}, key {key!r}: {why}")
        self.shard, self.key, self.why = shard, key, why


# ----------------------------------------------------------------------------- shard lists


def _expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` -> 6 strings; numeric ranges keep the width of their first bound (zero padding)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = int(numeric.group(1)), int(numeric.group(2))
        if hi < lo:
            raise ValueError(f"data_path: brace range {{{body}}} in {pattern!r} runs backwards")
        width = len(numeric.group(1))
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"data_path: brace group {{{body}}} in {pattern!r} is neither 'a..b' nor 'x,y'")
    return [out for option in options for out in _expand_braces(head + option + tail)]


def expand_shards(pattern: str | Path | Sequence[str | Path]) -> list[str]:
    """The shard files of a brace pattern (``DIR/{00000..00009}.tar``), a glob (``DIR/*.tar``), a folder, a
    ``::``-separated list, or a list of those; in the given order (globs and folders sorted), duplicates kept out.

    Local paths must exist; URLs (``scheme://``) are kept as they are and opened with fsspec.
    """
    items = [pattern] if isinstance(pattern, (str, Path)) else list(pattern)
    if not items:
        raise ValueError("data_path: no shard pattern given")
    shards: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            for path in _expand_braces(part):
                if "://" in path:
                    found = [path]
                elif os.path.isdir(path):
                    found = sorted(glob.glob(os.path.join(path, "*.tar")))
                elif glob.has_magic(path):
                    found = sorted(glob.glob(path))
                else:
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"data_path: shard {path} (from {str(item)!r}) does not exist")
                    found = [path]
                if not found:
                    raise FileNotFoundError(f"data_path: {path!r} (from {str(item)!r}) matches no shard")
                shards += [f for f in found if f not in shards]
    return shards


# ----------------------------------------------------------------------------- reading one shard


def _open_shard(shard: str) -> Any:
    if "://" in shard:
        import fsspec

        return fsspec.open(shard, "rb").open()
    return open(shard, "rb")


def _split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name: the key ends at the first dot of the base name."""
    directory, base = os.path.split(name)
    if base.startswith(".") or "." not in base:
        return None  # e.g. a stray "README" or a hidden file: not part of any sample
    stem, ext = base.split(".", 1)
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def _iter_samples(shard: str, wanted: Callable[[int], bool]) -> Iterator[tuple[str, dict[str, bytes] | None, str]]:
    """(key, {ext: bytes}, problem) per sample in tar order; members of samples that `wanted(index in shard)`
    rejects are not read (their dict is None); `problem` names a duplicated member. A tar that is truncated or
    not a tar raises BadSampleError after its last good sample."""
    index, key, members, problem, keep = -1, None, {}, "", False
    try:
        with _open_shard(shard) as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for info in tar:
                parts = _split_key(info.name) if info.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield key, members if keep else None, problem
                    index, key, members, problem = index + 1, parts[0], {}, ""
                    keep = wanted(index)
                if keep:
                    if parts[1] in members:
                        problem = f"member {info.name!r} appears twice"
                    members[parts[1]] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise BadSampleError(shard, key or "<start of shard>", f"unreadable tar after this key ({err})") from err
    if key is not None:
        yield key, members if keep else None, problem


def _text_lines(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def sample_to_row(shard: str, key: str, members: dict[str, bytes]) -> dict[str, Any]:
    """One tar sample -> one validated schema row; BadSampleError names the shard, the key and the member."""
    images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
    if len(images) != 1:
        raise BadSampleError(shard, key, f"needs exactly one image member ({'/'.join(IMAGE_EXTENSIONS)}), "
                                         f"found members {sorted(members)}")
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadSampleError(shard, key, f"member {key}.json is not valid JSON ({err})") from err
        if not isinstance(meta, dict):
            raise BadSampleError(shard, key, f"member {key}.json must hold an object, got {type(meta).__name__}")
    captions = meta.get("captions")
    if captions is None and "txt" in members:
        try:
            captions = _text_lines(members["txt"])
        except UnicodeDecodeError as err:
            raise BadSampleError(shard, key, f"member {key}.txt is not UTF-8 ({err})") from err
    if captions is None and isinstance(meta.get("caption"), str):
        captions = [meta["caption"]]
    row = {name: meta[name] for name in FEATURES if name in meta and name not in ("image", "captions")}
    row.update(image={"bytes": members[images[0]], "path": f"{key}.{images[0]}"}, captions=captions or [])
    row.setdefault("image_id", key)
    for name in FEATURES:
        row.setdefault(name, [])
    try:
        validate_row(row)
    except (ValueError, TypeError) as err:
        raise BadSampleError(shard, key, str(err)) from err
    return row


# ----------------------------------------------------------------------------- the stream


def _default_process() -> tuple[int, int]:
    """(process index, number of processes) of torch.distributed, else of the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class WebDatasetStream(IterableDataset):
    """A torch ``IterableDataset`` of schema rows from tar shards (see the module docstring for the order).

    ``repeat=True`` (training) loops over epochs forever, reshuffling each; ``repeat=False`` is one pass.
    ``skip_bad_samples``: a bad sample is logged with shard and key and skipped (counted in ``skipped`` of
    the process that read it), else BadSampleError stops the stream.
    """

    def __init__(self, shards: Sequence[str], *, seed: int = 0, shuffle_buffer: int = 1000, shuffle_shards: bool = True,
                 skip_bad_samples: bool = False, process_index: int = 0, num_processes: int = 1,
                 repeat: bool = True) -> None:
        if not shards:
            raise ValueError("shards: empty list")
        for name, value, low in (("seed", seed, 0), ("shuffle_buffer", shuffle_buffer, 0),
                                 ("num_processes", num_processes, 1), ("process_index", process_index, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
        if process_index >= num_processes:
            raise ValueError(f"process_index: {process_index} is not below num_processes {num_processes}")
        self.shards = list(shards)
        self.seed, self.shuffle_buffer, self.shuffle_shards = seed, shuffle_buffer, shuffle_shards
        self.skip_bad_samples, self.repeat = skip_bad_samples, repeat
        self.process_index, self.num_processes = process_index, num_processes
        self.transforms: list[Callable[[dict[str, Any]], Iterable[dict[str, Any]]]] = []
        self.columns: list[str] | None = list(FEATURES)
        self.consumed: list[int] | None = None  # items already consumed per slot of this process (restored)
        self.rotation = 0  # DataLoader worker w plays slot (w + rotation) % num_workers
        self.skipped: list[str] = []

    @property
    def column_names(self) -> list[str] | None:
        return self.columns

    def flat_map(self, fn: Callable[[dict[str, Any]], Iterable[dict[str, Any]]],
                 columns: list[str] | None = None) -> WebDatasetStream:
        """A copy whose items are ``fn(row)`` for each row (0..n items per row, e.g. one per caption), applied in
        the workers after the shuffle; positions count these items."""
        out = copy.copy(self)
        out.transforms, out.columns = [*self.transforms, fn], columns
        return out

    def unsplit(self) -> WebDatasetStream:
        """A one-pass copy that reads every shard (process 0 of 1): what each process must see alike, e.g. to build
        a tokenizer's vocabulary before training."""
        out = copy.copy(self)
        out.process_index, out.num_processes, out.repeat, out.consumed, out.rotation = 0, 1, False, None, 0
        return out

    def select_columns(self, columns: Sequence[str]) -> WebDatasetStream:
        """Rows reduced to `columns` (as ``datasets.IterableDataset.select_columns``)."""
        names = list(columns)
        return self.flat_map(_Select(names), columns=names)

    # -- order

    def fingerprint(self) -> dict[str, Any]:
        """What fixes the order: a saved position is valid only for a stream with the same fingerprint."""
        digest = hashlib.sha1("\n".join(self.shards).encode()).hexdigest()
        return {"shards": len(self.shards), "shards_sha1": digest, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "shuffle_shards": self.shuffle_shards, "repeat": self.repeat,
                "process_index": self.process_index, "num_processes": self.num_processes}

    def _slot_samples(self, epoch: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        """The validated rows of `slot` in `epoch`, before the shuffle buffer."""
        order = list(self.shards)
        if self.shuffle_shards:
            order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        by_shard = len(order) >= slots
        counter = itertools.count()  # sample split: the global sample index over all shards of the epoch

        def wanted(_: int) -> bool:
            return by_shard or next(counter) % slots == slot

        for shard in order[slot::slots] if by_shard else order:
            samples = _iter_samples(shard, wanted)
            while True:
                try:
                    key, members, problem = next(samples)
                except StopIteration:
                    break
                except BadSampleError as err:  # a broken tar: the rest of this shard is lost
                    self._bad(err)
                    break
                if members is None:
                    continue
                try:
                    if problem:
                        raise BadSampleError(shard, key, problem)
                    row = sample_to_row(shard, key, members)
                except BadSampleError as err:
                    self._bad(err)
                    continue
                yield row

    def _bad(self, err: BadSampleError) -> None:
        if not self.skip_bad_samples:
            raise BadSampleError(err.shard, err.key, f"{err.why} (use --skip_bad_samples to skip and count such "
                                                     "samples)") from err
        self.skipped.append(f"{err.shard}:{err.key}")
        logger.warning(f"skipping {err} ({len(self.skipped)} skipped by this reader)")

    def _slot_items(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        """Shuffled, transformed items of one slot over its epochs."""
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, slot])
            produced = 0
            for row in _shuffled(self._slot_samples(epoch, slot, slots), self.shuffle_buffer, rng):
                items: Iterable[dict[str, Any]] = [row]
                for fn in self.transforms:
                    items = [out for item in items for out in fn(item)]
                for item in items:
                    produced += 1
                    yield item
            if not self.repeat:
                return
            if produced == 0:
                raise ValueError(f"webdataset: reader {slot} of {slots} got no sample in epoch {epoch} (all bad, or "
                                 f"fewer samples than readers in {len(self.shards)} shards)")
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        if self.consumed is not None and len(self.consumed) != workers:
            raise ValueError(f"webdataset: the restored position is for {len(self.consumed)} DataLoader workers "
                             f"per process, this run has {workers} (keep --dataloader_num_workers when resuming)")
        local = (worker + self.rotation) % workers
        slots = self.num_processes * workers
        skip = self.consumed[local] if self.consumed is not None else 0
        items = self._slot_items(self.process_index * workers + local, slots)
        for _ in range(skip):  # re-derive the position: reads bytes and JSON, never decodes an image
            if next(items, None) is None:
                raise ValueError(f"webdataset: cannot restore position {skip} of reader {local}: its stream ends "
                                 "before (did the shards change?)")
        yield from items

    # -- position

    def advance(self, num_batches: int, batch_size: int, num_workers: int) -> dict[str, Any]:
        """The state after this process trained on `num_batches` more batches (from where it was restored)."""
        workers = max(num_workers, 1)
        consumed = list(self.consumed) if self.consumed is not None else [0] * workers
        if len(consumed) != workers:
            raise ValueError(f"webdataset: restored for {len(consumed)} workers, counted with {workers}")
        for k in range(min(num_batches, workers)):
            slot = (k + self.rotation) % workers
            consumed[slot] += batch_size * ((num_batches - k + workers - 1) // workers)
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint(), "consumed": consumed,
                "rotation": (self.rotation + num_batches) % workers}

    def state_dict(self) -> dict[str, Any]:
        """The restored position (before any new batches); see `advance` for the position after training."""
        return self.advance(0, 0, len(self.consumed) if self.consumed is not None else 0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` (from `advance` / `state_dict`) stopped; the fingerprint must match."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"webdataset state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        saved, here = state["fingerprint"], self.fingerprint()
        diff = {k: (saved.get(k), v) for k, v in here.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"webdataset state: saved for another stream; (saved, now) differ in {diff}")
        self.consumed, self.rotation = [int(n) for n in state["consumed"]], int(state["rotation"])


class _Select:
    """Picklable column selection for `select_columns` (DataLoader workers may be spawned)."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return [{c: row[c] for c in self.columns}]


def _shuffled(rows: Iterator[dict[str, Any]], size: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """A reservoir shuffle: fill `size` rows, then emit a random one per incoming row; drain in random order."""
    if size <= 1:
        yield from rows
        return
    buffer: list[dict[str, Any]] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = int(rng.integers(size))
        buffer[i], row = row, buffer[i]
        yield row
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def load_webdataset(pattern: str | Path | Sequence[str | Path], *, seed: int = 0, shuffle_buffer: int = 1000,
                    skip_bad_samples: bool = False, process_index: int | None = None,
                    num_processes: int | None = None, repeat: bool = True,
                    shuffle_shards: bool = True) -> WebDatasetStream:
    """Stream the shards of `pattern` (see `expand_shards`) as schema rows; process index and count default to
    torch.distributed's (or RANK / WORLD_SIZE), so under ``accelerate launch`` each process reads its own part."""
    rank, world = _default_process()
    return WebDatasetStream(expand_shards(pattern), seed=seed, shuffle_buffer=shuffle_buffer,
                            shuffle_shards=shuffle_shards, skip_bad_samples=skip_bad_samples,
                            process_index=rank if process_index is None else process_index,
                            num_processes=world if num_processes is None else num_processes, repeat=repeat)


# ----------------------------------------------------------------------------- Trainer glue


def webdataset_dataloader(stream: WebDatasetStream, args: Any, collate_fn: Callable[[list], Any]) -> DataLoader:
    """The training DataLoader of a stream, from TrainingArguments. Not `accelerator.prepare`d: the stream is
    already split per process (accelerate would read it whole on rank 0 and dispatch, or wrap it in an
    IterableDatasetShard that drops the other processes' share again); Trainer moves batches to the device.

    It has its own generator: starting its iterator then draws no number from the global torch RNG, which a
    resumed run restores just before (else its dropout masks would shift by one draw against the uninterrupted
    run's). The stream itself uses no torch randomness.
    """
    workers = args.dataloader_num_workers
    return DataLoader(stream, batch_size=args.per_device_train_batch_size, collate_fn=collate_fn,
                      num_workers=workers, pin_memory=args.dataloader_pin_memory, drop_last=True,
                      persistent_workers=args.dataloader_persistent_workers if workers else False,
                      prefetch_factor=args.dataloader_prefetch_factor if workers else None,
                      generator=torch.Generator().manual_seed(stream.seed))


class WebDatasetStateCallback(TrainerCallback):
    """Saves each process's stream position into ``checkpoint-N/webdataset_state/process_<i>.json`` and restores
    it when training resumes (from Trainer's resumed ``global_step``), before the DataLoader workers start.

    Needs ``ignore_data_skip=True`` on resume: the stream continues by itself, Trainer must not skip batches too.
    """

    def __init__(self, stream: WebDatasetStream) -> None:
        self.stream = stream
        self.start_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start_step = state.global_step
        if state.global_step == 0:
            return
        folder = _resumed_folder(args, state.global_step)
        path = folder / STATE_DIR / f"process_{args.process_index}.json"
        if not path.is_file():
            raise FileNotFoundError(f"webdataset: resuming from {folder} but it has no stream position {path} "
                                    "(saved by a run without WebDatasetStateCallback?)")
        if not args.ignore_data_skip:
            raise ValueError("webdataset: set ignore_data_skip=True when resuming a webdataset stream (it continues "
                             "from its saved position; Trainer would skip the batches a second time)")
        self.stream.load_state_dict(json.loads(path.read_text()))
        logger.info(f"webdataset: stream restored from {path}: items consumed per reader {self.stream.consumed}")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        batches = (state.global_step - self.start_step) * args.gradient_accumulation_steps
        position = self.stream.advance(batches, args.per_device_train_batch_size, args.dataloader_num_workers)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"process_{args.process_index}.json.tmp"
        tmp.write_text(json.dumps({**position, "global_step": state.global_step}, indent=1))
        tmp.replace(folder / f"process_{args.process_index}.json")


def _resumed_folder(args: Any, step: int) -> Path:
    """The checkpoint Trainer resumed from: ``output_dir/checkpoint-<step>`` or an explicit path of that step."""
    candidates = [Path(args.output_dir) / f"checkpoint-{step}"]
    if isinstance(args.resume_from_checkpoint, str) and os.path.isdir(args.resume_from_checkpoint):
        candidates.insert(0, Path(args.resume_from_checkpoint))
    for folder in candidates:
        if (folder / "trainer_state.json").is_file() and json.loads(
                (folder / "trainer_state.json").read_text()).get("global_step") == step:
            return folder
    return candidates[-1]
