"""WebDataset shards: schema round trip, process x worker split, deterministic shuffle, exact resume, bad samples."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Image, load_dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments

from leanvlp.data import FEATURES, make_shapes_dataset
from leanvlp.data.shapes import generate_shapes_row
from leanvlp.data.webdataset import (BadSampleError, WebDatasetStateCallback, WebDatasetStream, expand_shards,
                                     load_webdataset, webdataset_dataloader)

_spec = importlib.util.spec_from_file_location("write_shards", Path(__file__).parents[1] / "scripts/write_shards.py")
write_shards_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_shards_module)
write_shards = write_shards_module.write_shards

NUM = 24


def _index(row: dict) -> int:
    return int(row["image_id"].rsplit("-", 1)[1])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 shapes rows (32 px) in 6 shards of 4."""
    out = tmp_path_factory.mktemp("shards")
    write_shards((generate_shapes_row(i, 0, 32) for i in range(NUM)), out, samples_per_shard=4)
    return out


def _ids(stream: WebDatasetStream, workers: int) -> list[int]:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [_index(row) for row in loader]


def test_expand_shards_braces_globs_and_errors(shards: Path) -> None:
    names = [f"{shards}/{i:05d}.tar" for i in range(6)]
    assert expand_shards(f"{shards}/{{00000..00005}}.tar") == names
    assert expand_shards(f"{shards}/{{00003,00001}}.tar") == [names[3], names[1]]
    assert expand_shards(f"{shards}/*.tar") == names
    assert expand_shards(str(shards)) == names
    assert expand_shards([f"{shards}/0000{{0..1}}.tar", f"{shards}/00001.tar::{shards}/00002.tar"]) == names[:3]
    with pytest.raises(FileNotFoundError, match="00006.tar"):
        expand_shards(f"{shards}/{{00000..00006}}.tar")
    with pytest.raises(FileNotFoundError, match=r"\*\.tgz"):
        expand_shards(f"{shards}/*.tgz")
    with pytest.raises(ValueError, match="backwards"):
        expand_shards(f"{shards}/{{00005..00001}}.tar")


def test_rows_equal_in_memory_rows(shards: Path) -> None:
    stream = load_webdataset(f"{shards}/{{00000..00005}}.tar", shuffle_buffer=0, shuffle_shards=False, repeat=False)
    streamed = Dataset.from_list(list(stream), features=FEATURES)
    memory = make_shapes_dataset(NUM, image_size=32)
    assert streamed.features == memory.features == FEATURES
    for got, want in zip(streamed, memory, strict=True):
        assert np.array_equal(np.asarray(got.pop("image")), np.asarray(want.pop("image")))
        assert got == want


def test_reads_what_datasets_webdataset_builder_reads(shards: Path) -> None:
    """Same samples, keys, image bytes and metadata as `load_dataset("webdataset", streaming=True)`."""
    files = [str(p) for p in sorted(shards.glob("*.tar"))]
    reference = load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    reference = reference.cast_column("png", Image(decode=False))
    ours = load_webdataset(files, shuffle_buffer=0, shuffle_shards=False, repeat=False)
    for ref, row in zip(reference, ours, strict=True):
        assert row["image"] == {"bytes": ref["png"]["bytes"], "path": f"{ref['__key__']}.png"}
        assert {k: v for k, v in row.items() if k != "image"} == ref["json"]
        assert row["captions"] == ref["txt"].split("\n")


@pytest.mark.parametrize("shards_used", [6, 2], ids=["by_shard", "by_sample"])
def test_two_processes_two_workers_disjoint_union(shards: Path, shards_used: int) -> None:
    """2 processes (simulated by process_index) x 2 real DataLoader workers; with 2 shards < 4 readers the
    split falls back to every 4th sample."""
    pattern = f"{shards}/{{00000..{shards_used - 1:05d}}}.tar"
    seen = [_ids(load_webdataset(pattern, seed=5, shuffle_buffer=3, process_index=p, num_processes=2, repeat=False),
                 workers=2) for p in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(4 * shards_used))
    assert len(seen[0]) == len(set(seen[0]))
    whole = load_webdataset(pattern, seed=5, shuffle_buffer=3, process_index=1, num_processes=2, repeat=False).unsplit()
    assert sorted(_ids(whole, workers=2)) == list(range(4 * shards_used))


def _gloo_worker(rank: int, port: int, pattern: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stream = load_webdataset(pattern, seed=5, shuffle_buffer=3, repeat=False)  # process index from torch.distributed
    ids = _ids(stream, workers=2)
    gathered: list = [None, None]
    torch.distributed.all_gather_object(gathered, ids)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def test_real_gloo_processes_read_disjoint_parts(shards: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ids.json"
    # fork: spawn would re-import this test module in each process, minutes on a busy CPU
    torch.multiprocessing.start_processes(_gloo_worker, args=(port, f"{shards}/*.tar", str(out)), nprocs=2,
                                          start_method="fork")
    first, second = json.loads(out.read_text())
    assert not set(first) & set(second) and sorted(first + second) == list(range(NUM))
    simulated = _ids(load_webdataset(f"{shards}/*.tar", seed=5, shuffle_buffer=3, process_index=1, num_processes=2,
                                     repeat=False), workers=2)
    assert second == simulated


def test_order_deterministic_for_a_seed(shards: Path) -> None:
    def order(seed: int) -> list[int]:
        return _ids(load_webdataset(f"{shards}/*.tar", seed=seed, shuffle_buffer=5, repeat=False), workers=2)

    first = order(7)
    assert first == order(7)
    assert sorted(first) == list(range(NUM))
    assert first != order(8)
    assert first != sorted(first)  # shuffled


def _batches(stream: WebDatasetStream, count: int, workers: int, batch_size: int) -> list[list[int]]:
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers,
                        collate_fn=lambda rows: [_index(r) for r in rows])
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out
    raise AssertionError("stream ended")


@pytest.mark.parametrize("workers,stop", [(2, 5), (0, 4)])
def test_interrupted_stream_resumes_exactly(shards: Path, workers: int, stop: int) -> None:
    """Stop after `stop` batches (odd: the next batch is worker 1's), save, restore into a fresh stream: the
    batches, in order, are those of an uninterrupted run, across the epoch boundary (12 x 3 > 24 samples)."""
    def stream() -> WebDatasetStream:
        return load_webdataset(f"{shards}/*.tar", seed=11, shuffle_buffer=6)

    full = _batches(stream(), 12, workers, 3)
    assert sorted(sum(full[:8], [])) == list(range(NUM))  # epoch 0 once (2 workers x 12 samples)
    first = stream()
    head = _batches(first, stop, workers, 3)
    state = json.loads(json.dumps(first.advance(stop, 3, workers)))  # as saved in a checkpoint
    resumed = stream()
    resumed.load_state_dict(state)
    assert head + _batches(resumed, 12 - stop, workers, 3) == full
    other = load_webdataset(f"{shards}/*.tar", seed=12, shuffle_buffer=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


class _Probe(nn.Module):
    """Regresses each sample's index from its mean colour and records the indices it trained on; its dropout
    makes the losses depend on the torch RNG, which a resumed run must continue alike."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 1))
        self.seen: list[list[int]] = []

    def forward(self, pixel_values: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append(index.tolist())
        prediction = self.linear(pixel_values).squeeze(-1)  # (B,)
        return {"loss": ((prediction - index.float() / NUM) ** 2).mean()}


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    import PIL.Image

    pixels = [np.asarray(PIL.Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB"), np.float32).mean((0, 1)) / 255
              for r in rows]
    return {"pixel_values": torch.tensor(np.stack(pixels)), "index": torch.tensor([_index(r) for r in rows])}


class _StreamTrainer(Trainer):
    def get_train_dataloader(self) -> DataLoader:
        return webdataset_dataloader(self.train_dataset, self.args, self.data_collator)


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step == self.step:
            control.should_training_stop = True


def _train(shards: Path, out: Path, stop: int | None = None, resume: str | None = None) -> tuple[_Probe, Trainer]:
    torch.manual_seed(0)
    stream = load_webdataset(f"{shards}/*.tar", seed=3, shuffle_buffer=5)
    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=3, learning_rate=0.5,
                             save_strategy="steps", save_steps=3, logging_steps=1, dataloader_num_workers=2,
                             ignore_data_skip=True, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    model = _Probe()
    callbacks = [WebDatasetStateCallback(stream)] + ([_StopAt(stop)] if stop else [])
    trainer = _StreamTrainer(model=model, args=args, train_dataset=stream, data_collator=_collate, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_trainer_resume_sees_the_same_samples_and_losses(shards: Path, tmp_path: Path) -> None:
    full_model, full = _train(shards, tmp_path / "full")
    part_model, _ = _train(shards, tmp_path / "part", stop=3)
    saved = json.loads((tmp_path / "part/checkpoint-3/webdataset_state/process_0.json").read_text())
    assert saved["consumed"] == [6, 3] and saved["rotation"] == 1  # batches 0, 2 from worker 0; batch 1 from worker 1
    resumed_model, resumed = _train(shards, tmp_path / "part", resume=str(tmp_path / "part/checkpoint-3"))
    assert part_model.seen + resumed_model.seen == full_model.seen
    assert sorted(sum(full_model.seen, [])) == sorted(set(sum(full_model.seen, [])))  # 18 distinct of 24

    def losses(trainer: Trainer) -> list[float]:
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    assert len(losses(full)) == 6
    np.testing.assert_allclose(losses(resumed), losses(full), rtol=1e-6)  # same fp32 ops in the same order


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_members_named_with_shard_and_key(shards: Path, tmp_path: Path) -> None:
    with tarfile.open(shards / "00000.tar") as tar:
        good = [(m.name, tar.extractfile(m).read()) for m in tar]  # 4 samples x (png, txt, json)
    bad = tmp_path / "bad.tar"
    broken = list(good)
    broken[2] = ("000000000.json", b"{not json")
    broken[3] = ("000000001.png", b"\xff\xd8 not an image")
    _tar(bad, broken)
    with pytest.raises(BadSampleError, match=rf"{bad}.*'000000000'.*000000000\.json is not valid JSON") as error:
        list(load_webdataset(str(bad), shuffle_buffer=0, repeat=False))
    assert str(error.value).count("--skip_bad_samples") == 1
    stream = load_webdataset(str(bad), shuffle_buffer=0, repeat=False, skip_bad_samples=True)
    assert [_index(r) for r in stream] == [2, 3]
    assert stream.skipped == [f"{bad}:000000000", f"{bad}:000000001"]
    with pytest.raises(BadSampleError, match=rf"'000000001'.*image.*cannot be read"):
        list(load_webdataset(str(bad), shuffle_buffer=0, repeat=False, process_index=1, num_processes=2))

    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes((shards / "00000.tar").read_bytes()[:2500])
    with pytest.raises(BadSampleError, match=r"truncated\.tar.*unreadable tar"):
        list(load_webdataset(str(truncated), shuffle_buffer=0, repeat=False))


@pytest.mark.slow
def test_train_py_on_shards_resumes_the_stream_with_the_same_losses(tmp_path):
    """`train.py --dataset webdataset`: a run stopped after checkpoint-2 and resumed with `latest` logs the same
    losses at steps 3-4 as an uninterrupted run (constant lr, so the two schedules agree; 2 DataLoader workers)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    write_shards_module.write_shards(make_shapes_dataset(48, seed=3, image_size=32), tmp_path / "shards",
                                     samples_per_shard=12)
    flags = ["--dataset", "webdataset", "--data_path", str(tmp_path / "shards" / "{00000..00003}.tar"),
             "--shuffle_buffer", "16", "--dataloader_num_workers", "2", "--logging_steps", "1",
             "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2",
             "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--learning_rate", "0.003",
             "--tiny_image_size", "32", "--bridge_r", "4", "--tiny_llm_hidden", "32", "--bridge_hidden", "32",
             "--tiny_vision_hidden", "32", "--bridge_dropout", "0", "--num_eval_images", "0", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def train(out: Path, steps: int, *extra: str) -> tuple[dict[str, float], str]:
        run = subprocess.run([sys.executable, str(root / "train.py"), *flags, "--max_steps", str(steps),
                              "--output_dir", str(out), *extra], env={**env, "TRANSFORMERS_VERBOSITY": "info"},
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads((out / "training_summary.json").read_text())["losses"], run.stderr

    whole, _ = train(tmp_path / "whole", 4)
    train(tmp_path / "parts", 2)
    assert (tmp_path / "parts" / "checkpoint-2" / "webdataset_state").is_dir()
    resumed, log = train(tmp_path / "parts", 4, "--resume_from_checkpoint", "latest")
    assert "Resuming training from checkpoint with epoch 0 and global step 2" in log  # it resumed, not restarted
    for step in ("3", "4"):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5), (step, whole, resumed)
    assert whole["3"] != whole["1"]  # the losses move: equal losses are not an accident of a frozen model
