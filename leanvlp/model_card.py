"""Hub model cards for saved leanvlp checkpoints, built on huggingface_hub's ModelCard.

`write_model_card(dir, family=..., base_models=[...], datasets=[...])` renders the family's
template from `model_cards/<family>.md` into `dir/README.md`: YAML front matter (library_name,
pipeline_tag, tags, base_model, datasets, metrics, model-index) and sections for summary, usage,
training, evaluation, speed, limitations and citations. `python -m leanvlp.model_card DIR`
regenerates it from the folder alone; `push_to_hub(dir, repo_id)` uploads folder and card.

`library_name` is `transformers`: a saved folder loads with the transformers Auto classes
(`trust_remote_code=True` without leanvlp installed; nothing extra with it), which is what the
Hub's "Use this model" button and widgets expect.

eval_results.json (written by eval, read here) is a JSON object; a bare list of entries is
accepted as shorthand for {"results": [...]}:

    {"results": [
      {"task": "caption", "dataset": "shapes", "split": "test",
       "metrics": {"bleu_4": 0.41, "cider": 1.32, "rouge_l": 0.62}},
      {"task": "vqa", "dataset": "easy-vqa", "dataset_name": "easy-VQA", "metrics": {"vqa_accuracy": 0.87}},
      {"task": "retrieval", "dataset": "shapes", "metrics": {"i2t_r1": 0.5, "t2i_r1": 0.4, "r_mean": 0.7}},
      {"task": "speed", "dataset": "shapes", "metrics": {"speedup": 1.9},
       "rows": [{"setting": "merging off", "visual tokens": 257, "images/s": 410.0},
                {"setting": "merging on", "visual tokens": 29, "images/s": 780.0}]}
    ]}

- task: caption | vqa | retrieval | speed, or any name with an explicit "task_type" (Hub task id).
- dataset: dataset id (model-index `dataset.type`); dataset_name (display name) and split optional.
- metrics: {name: number}; names are leanvlp.metrics' keys (bleu_1..4, cider, rouge_l,
  vqa_accuracy, i2t_r1.., t2i_r1.., r_mean) or any other; values are copied unrounded into
  model-index, so the card's numbers equal the file's.
- rows (speed only): the speed table, one dict per setting, columns in first-seen order.
Speed entries feed the speed table, not model-index (the Hub's model-index is for quality).

training_summary.json (optional, written by train; {key: value}) becomes the training table, a mapping
in one cell; its "base_models", "datasets" (lists of Hub ids: real ones only) and "license" keys instead
fill the front matter when the card is regenerated from the folder (CLI, push_to_hub, eval).

Templates live in the repository's `model_cards/` folder (jinja, as `ModelCard.from_template`
takes them; variables: card_data, model_name, summary, description, training_data, license_line,
base_model_licenses, architectures, base_model, usage_snippet, training_rows, eval_rows, speed_columns,
speed_rows). The summary line and the description follow config.json (frozen or trained towers) and the
training summary (the task trained); training_summary.json's "license" and "base_model_licenses" fill the
licence lines, "training_data" the data line, "losses" one first -> last row of the training table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants

TEMPLATES_DIR = Path(__file__).resolve().parent / "model_cards"  # package data; ./model_cards links here

# family (config.json model_type) -> what its card says about it
FAMILIES: dict[str, dict[str, Any]] = {
    "merge_bridge": {
        "pipeline_tag": "image-text-to-text",
        "tags": ["token-merging", "image-captioning", "visual-question-answering"],
    },
    "patch_align": {
        "pipeline_tag": "image-text-to-text",
        "tags": ["patch-pruning", "patch-text-alignment", "image-text-retrieval"],
    },
}
# training task -> what a model trained on it does (the card's first line)
TASK_PHRASES = {
    "caption": "captions images",
    "vqa": "answers short questions about images",
    "pretrain": "embeds images and texts for retrieval (ITC / ITM), pretrained with captioning and patch-text "
                "alignment",
    "retrieval": "retrieves images for texts and texts for images (ITC + ITM re-ranking)",
}
COMMON_TAGS = ["leanvlp", "vision-language"]
METADATA_KEYS = ("base_models", "datasets", "license")  # training_summary.json keys that go to the front matter
# training_summary.json keys the card's text uses instead of the training table
TEXT_KEYS = ("base_model_licenses", "losses", "logged", "training_data")

# eval task -> (Hub task id, display name)
TASK_TYPES = {
    "caption": ("image-to-text", "Image captioning"),
    "vqa": ("visual-question-answering", "Visual question answering"),
    "retrieval": ("image-text-retrieval", "Image-text retrieval"),
}
# metric key -> (Hub metric id for the `metrics` list, display name)
METRIC_NAMES = {
    **{f"bleu_{n}": ("bleu", f"BLEU-{n}") for n in range(1, 5)},
    "cider": ("cider", "CIDEr-D"),
    "rouge_l": ("rouge", "ROUGE-L"),
    "vqa_accuracy": ("accuracy", "VQA accuracy"),
    **{f"i2t_r{k}": ("recall", f"Image-to-text R@{k}") for k in (1, 5, 10)},
    **{f"t2i_r{k}": ("recall", f"Text-to-image R@{k}") for k in (1, 5, 10)},
    "r_mean": ("recall", "Mean recall"),
    "token_accuracy": ("accuracy", "Token accuracy (teacher-forced)"),
    "object_precision": ("precision", "Object precision (colour, shape)"),
    "object_recall": ("recall", "Object recall (colour, shape)"),
    "object_f1": ("f1", "Object F1 (colour, shape)"),
}

USAGE_SNIPPETS = {
    "merge_bridge": '''\
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{model_id}"
# With leanvlp installed (`import leanvlp`) trust_remote_code is not needed.
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True)

image = Image.new("RGB", (224, 224), "white")  # your image here
inputs = processor(images=image, return_tensors="pt")  # caption prompt; see processor.build_prompt("vqa", ...)
with torch.no_grad():
    output_ids = model.generate(**inputs, max_new_tokens=30)
new_tokens = output_ids[:, inputs["input_ids"].shape[1]:]
print(processor.batch_decode(new_tokens, skip_special_tokens=True)[0])''',
    "patch_align": '''\
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{model_id}"
# With leanvlp installed (`import leanvlp`) trust_remote_code is not needed.
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True)

image = Image.new("RGB", (224, 224), "white")  # your image here
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    output_ids = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=30)
print(processor.tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0])''',
}


# ------------------------------------------------------------------------------ folder reading


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """The folder's config.json; a missing folder or file is a clear FileNotFoundError."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model_dir {str(model_dir)!r} is not a directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"model_dir {str(model_dir)!r} has no config.json: not a saved leanvlp model (save_pretrained writes it)"
        )
    config = _read_json(config_path, "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"config.json in {str(model_dir)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")


def parse_eval_results(data: Any) -> list[dict[str, Any]]:
    """Validate eval_results (the format in the module docstring) -> list of entries."""
    results = data.get("results") if isinstance(data, dict) else data
    if not isinstance(results, list):
        raise ValueError(f"eval_results must be a list of entries or {{'results': [...]}}, got {data!r:.200}")
    for i, entry in enumerate(results):
        where = f"eval_results['results'][{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object, got {entry!r:.100}")
        for key in ("task", "dataset"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ValueError(f"{where}['{key}'] must be a non-empty string, got {entry.get(key)!r}")
        if entry["task"] not in TASK_TYPES and entry["task"] != "speed" and "task_type" not in entry:
            raise ValueError(
                f"{where}['task'] = {entry['task']!r} is unknown; use one of {[*TASK_TYPES, 'speed']} "
                "or give a 'task_type' (Hub task id)"
            )
        metrics = entry.get("metrics", {} if entry["task"] == "speed" else None)
        if not isinstance(metrics, dict) or (not metrics and entry["task"] != "speed"):
            raise ValueError(f"{where}['metrics'] must be a non-empty object of numbers, got {metrics!r}")
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}['metrics'][{name!r}] must be a finite number, got {value!r}")
        rows = entry.get("rows", [])
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{where}['rows'] must be a list of objects, got {rows!r:.100}")
    return results


def read_training_summary(model_dir: str | Path) -> dict[str, Any]:
    """model_dir/training_summary.json as a dict ({} when absent)."""
    path = Path(model_dir) / "training_summary.json"
    summary = _read_json(path, "training_summary.json") if path.is_file() else {}
    if not isinstance(summary, dict):
        raise ValueError(f"training_summary.json must hold a JSON object, got {type(summary).__name__}")
    return summary


def card_kwargs_from_folder(model_dir: str | Path) -> dict[str, Any]:
    """What a card needs that only the folder knows: family, base_models, datasets.

    base_models / datasets come from training_summary.json, else from an existing README.md.
    """
    model_dir = Path(model_dir)
    family = read_config(model_dir).get("model_type")
    if not isinstance(family, str):
        raise ValueError(f"config.json in {str(model_dir)!r} has no model_type; cannot tell the model family")
    _check_family(family)
    summary = read_training_summary(model_dir)
    old = ModelCard.load(model_dir / "README.md").data if (model_dir / "README.md").is_file() else None

    def listed(key: str, card_key: str) -> list[str]:
        value = summary.get(key) or (getattr(old, card_key, None) if old else None) or []
        return [value] if isinstance(value, str) else list(value)

    return {
        "family": family,
        "base_models": listed("base_models", "base_model"),
        "datasets": listed("datasets", "datasets"),
        "license": summary.get("license") or (getattr(old, "license", None) if old else None),
    }


# ------------------------------------------------------------------------------ card building


def _fmt(value: Any) -> str:
    """Table cell: floats to 4 significant digits, everything else as str (| escaped)."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _cell(value: Any) -> str:
    """A summary value as one table cell: a mapping as `k=v, ...`, a list comma-joined, a float to 4 digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) if value else "none"
    return _fmt(value)


def _training_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The training table: one row per summary key (mappings in one cell), the logged loss as first -> last; the
    keys the front matter or the text carry are left out, so the table is the same however the card is built."""
    rows = [(key, _cell(value)) for key, value in summary.items() if key not in METADATA_KEYS and key not in TEXT_KEYS]
    losses = list((summary.get("losses") or {}).items())
    if losses:
        rows.append(("logged loss (first -> last)",
                     f"{_fmt(float(losses[0][1]))} (step {losses[0][0]}) -> {_fmt(float(losses[-1][1]))} "
                     f"(step {losses[-1][0]})"))
    return rows


def _frozen_text(frozen: bool | None, what: str) -> str:
    return {True: f"a frozen {what}", False: f"a trained {what}"}.get(frozen, f"a {what}")


def _description(family: str, config: dict[str, Any], summary: dict[str, Any]) -> tuple[str, str]:
    """The card's first line and its architecture paragraph, from what config.json and the training summary say
    (frozen or trained towers, the task trained), not from the family's defaults."""
    task = summary.get("task")
    does = TASK_PHRASES.get(task, "relates images and text")
    if family == "merge_bridge":
        summary_line = (f"A vision-language model that {does}, with a token-merging bridge that hands the LLM a "
                        "short visual prefix.")
        merging = config.get("bridge_merging") or {}
        body = (f"{_frozen_text(config.get('freeze_vision'), 'vision tower').capitalize()} feeds a BERT-style bridge "
                f"that merges visual tokens layer by layer (ToMe bipartite soft matching, r={merging.get('r', '?')} "
                f"per layer); the short visual prefix that remains is projected into "
                f"{_frozen_text(config.get('freeze_llm'), 'causal LLM')}, trained with one language-modelling loss "
                f"on {'answers' if task == 'vqa' else 'captions'} (SimVLG / EVLGen).")
    else:
        summary_line = (f"An end-to-end vision-language model that {does}, pruning text-irrelevant image patches "
                        "inside its vision transformer.")
        weights = config.get("loss_weights") or {}
        losses = [k.upper() for k, w in weights.items() if w] if task in ("pretrain", "retrieval") else \
            ["LM (" + ("answers" if task == "vqa" else "captions") + ")"]
        body = ("A text-aware patch detector inside the ViT keeps only the patches relevant to the text, so later "
                "blocks run on fewer tokens (COPA); " + f"trained with {', '.join(losses) or 'no'} loss(es)"
                + (" and semantic visual heads" if any((config.get("semantic_heads") or {}).get(h, {}).get("enabled")
                                                      for h in ("object_class", "attribute", "region_feature"))
                   else "") + ".")
    if not task:
        summary_line = summary_line.replace(f" that {does}", "")
    return summary_line, body


def base_model_licenses(base_models: Sequence[str]) -> dict[str, str]:
    """Each base model's licence as its own card states it (a local folder's README.md front matter); a Hub id
    that is not a local folder is named for the reader to check (offline, nothing is fetched)."""
    out = {}
    for model in base_models:
        readme = Path(model) / "README.md"
        if readme.is_file():
            out[model] = getattr(ModelCard.load(readme).data, "license", None) or "not stated in its card"
        else:
            out[model] = "see its model card on the Hub"
    return out


def _eval_results(entries: list[dict[str, Any]]) -> list[EvalResult]:
    out = []
    for entry in entries:
        if entry["task"] == "speed":
            continue
        task_type, task_name = TASK_TYPES.get(entry["task"], (entry.get("task_type"), entry["task"]))
        for metric, value in entry["metrics"].items():
            out.append(
                EvalResult(
                    task_type=entry.get("task_type", task_type),
                    task_name=task_name,
                    dataset_type=entry["dataset"],
                    dataset_name=entry.get("dataset_name", entry["dataset"]),
                    dataset_split=entry.get("split"),
                    metric_type=metric,
                    metric_name=METRIC_NAMES.get(metric, (metric, metric))[1],
                    metric_value=value,
                )
            )
    return out


def build_model_card(
    model_dir: str | Path,
    *,
    family: str,
    base_models: list[str],
    datasets: list[str],
    eval_results: dict | list | None = None,
    training_summary: dict | None = None,
    speed_table: list[dict] | None = None,
    usage_snippet: str | None = None,
    model_id: str | None = None,
    tags: Sequence[str] = (),
    license: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """The card for the saved model in `model_dir` (not written; see write_model_card).

    eval_results and training_summary default to model_dir's eval_results.json and
    training_summary.json when present (less its metadata keys); speed_table to the rows of the
    speed entries. model_id (a Hub repo id, default the folder path) goes into the usage snippet.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    _check_family(family)
    if config.get("model_type") not in (None, family):
        raise ValueError(f"family {family!r} does not match config.json model_type {config['model_type']!r}")
    for name, value in (("base_models", base_models), ("datasets", datasets), ("tags", tags)):
        if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
            raise TypeError(f"{name} must be a list of non-empty strings, got {value!r}")

    if training_summary is None:
        training_summary = {k: v for k, v in read_training_summary(model_dir).items() if k not in METADATA_KEYS}
    if not isinstance(training_summary, dict):
        raise TypeError(f"training_summary must be a dict, got {type(training_summary).__name__}")
    if eval_results is None and (model_dir / "eval_results.json").is_file():
        eval_results = _read_json(model_dir / "eval_results.json", "eval_results.json")
    entries = parse_eval_results(eval_results) if eval_results is not None else []
    if speed_table is None:
        speed_table = [row for e in entries if e["task"] == "speed" for row in e.get("rows", [])]
    if not isinstance(speed_table, list) or not all(isinstance(row, dict) for row in speed_table):
        raise TypeError(f"speed_table must be a list of dicts (one row per setting), got {speed_table!r:.100}")
    speed_columns = list(dict.fromkeys(key for row in speed_table for key in row))

    info = FAMILIES[family]
    full_summary = read_training_summary(model_dir) if (model_dir / "training_summary.json").is_file() else {}
    text = {**full_summary, **training_summary}
    summary_line, description = _description(family, config, text)
    licenses = text.get("base_model_licenses") or base_model_licenses(base_models)
    model_name = model_id.split("/")[-1] if model_id else model_dir.resolve().name
    results = _eval_results(entries)
    metric_ids = list(dict.fromkeys(METRIC_NAMES.get(r.metric_type, (r.metric_type,))[0] for r in results))
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=info["pipeline_tag"],
        tags=list(dict.fromkeys([*COMMON_TAGS, *info["tags"], *tags])),
        base_model=list(base_models) or None,
        datasets=list(datasets) or None,
        metrics=metric_ids or None,
        license=license,
        eval_results=results or None,
    )
    snippet = usage_snippet or USAGE_SNIPPETS[family].format(model_id=model_id or str(model_dir))
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATES_DIR / f"{family}.md"),
        model_name=model_name,
        summary=summary_line,
        description=description,
        training_data=text.get("training_data"),
        license_line=f"`{license}`" if license else "none given (pass `--license` to train.py or the card CLI)",
        base_model_licenses=licenses,
        architectures=config.get("architectures") or [],
        usage_snippet=snippet.strip("\n"),
        training_rows=_training_rows(training_summary),
        eval_rows=[
            {
                "task": r.task_name,
                "dataset": r.dataset_name,
                "split": r.dataset_split or "",
                "metric": r.metric_name,
                "value": _fmt(r.metric_value),
            }
            for r in results
        ],
        speed_columns=speed_columns,
        speed_rows=[[_fmt(row.get(c, "")) for c in speed_columns] for row in speed_table],
    )


def write_model_card(model_dir: str | Path, **kwargs: Any) -> Path:
    """build_model_card(model_dir, **kwargs) saved as model_dir/README.md; returns its path."""
    card = build_model_card(model_dir, **kwargs)
    path = Path(model_dir) / "README.md"
    card.save(path)
    return path


# ------------------------------------------------------------------------------ Hub upload


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    *,
    private: bool | None = None,
    endpoint: str | None = None,
    **card_kwargs: Any,
) -> str:
    """Regenerate the card (model id = repo_id) and upload folder + card; returns the commit URL.

    Offline or unreachable Hub -> one ConnectionError line, and the local folder is left as it was
    (README.md is rewritten only for the upload and restored if the upload fails).
    """
    model_dir = Path(model_dir)
    kwargs = {**card_kwargs_from_folder(model_dir), **card_kwargs, "model_id": repo_id}
    card = build_model_card(model_dir, **kwargs)  # bad input fails before any network use
    if _hub_offline():
        raise ConnectionError(
            f"cannot push {str(model_dir)!r} to {repo_id!r}: the Hugging Face Hub is offline (HF_HUB_OFFLINE is set)"
        )
    readme = model_dir / "README.md"
    old_readme = readme.read_bytes() if readme.is_file() else None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        card.save(readme)
        commit = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, commit_message="Upload leanvlp model")
    except Exception as e:  # network, auth, offline: all end the same way for the user
        if old_readme is None:
            readme.unlink(missing_ok=True)
        else:
            readme.write_bytes(old_readme)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConnectionError(f"cannot push {str(model_dir)!r} to {repo_id!r}: {type(e).__name__}: {reason}") from None
    return str(getattr(commit, "commit_url", commit))


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m leanvlp.model_card DIR`: regenerate DIR/README.md from the folder's files."""
    parser = argparse.ArgumentParser(
        prog="leanvlp-card", description="Regenerate the Hub model card (README.md) of a saved leanvlp model."
    )
    parser.add_argument("model_dir", help="folder written by save_pretrained (config.json, eval_results.json, ...)")
    parser.add_argument("--base-model", action="append", default=None, help="base model id (repeatable)")
    parser.add_argument("--dataset", action="append", default=None, help="training dataset id (repeatable)")
    parser.add_argument("--model-id", default=None, help="Hub repo id used in the usage snippet")
    parser.add_argument("--license", default=None, help="the card's licence (a Hub licence id, e.g. apache-2.0)")
    parser.add_argument("--push", metavar="REPO_ID", default=None, help="also upload folder + card to this repo")
    args = parser.parse_args(argv)
    try:
        kwargs = card_kwargs_from_folder(args.model_dir)
        if args.base_model:
            kwargs["base_models"] = args.base_model
        if args.dataset:
            kwargs["datasets"] = args.dataset
        if args.license:
            kwargs["license"] = args.license
        if args.push:
            print(push_to_hub(args.model_dir, args.push, **kwargs))
        else:
            print(write_model_card(args.model_dir, model_id=args.model_id, **kwargs))
    except (OSError, ValueError, TypeError) as e:  # ConnectionError is an OSError
        print(f"leanvlp-card: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "FAMILIES",
    "build_model_card",
    "card_kwargs_from_folder",
    "main",
    "parse_eval_results",
    "push_to_hub",
    "read_config",
    "read_training_summary",
    "write_model_card",
]


if __name__ == "__main__":
    sys.exit(main())
