"""Data: the one row schema, the embedded shapes dataset, loaders (COCO folders, any `datasets` set), and what
both recipes read from them: task pairs and decoded images (`pairs`), collators into model inputs (`collate`)."""

from .coco import load_coco_folder
from .collate import ImageCollator, MergeBridgeCollator, PatchAlignCollator
from .hf import load_hf_dataset, to_schema
from .pairs import decode_image, eval_rows, images_and_captions, load_split, task_rows, to_pairs
from .schema import FEATURES, SCHEMA, VIDEO_FEATURES, to_rgb, validate_row
from .shapes import (make_shapes_dataset, make_shapes_splits, make_video_shapes_dataset, save_sample_grid,
                     shapes_statistics)
from .webdataset import WebDatasetStateCallback, WebDatasetStream, expand_shards, load_webdataset, webdataset_dataloader

__all__ = [
    "FEATURES",
    "SCHEMA",
    "VIDEO_FEATURES",
    "ImageCollator",
    "MergeBridgeCollator",
    "PatchAlignCollator",
    "decode_image",
    "eval_rows",
    "images_and_captions",
    "load_coco_folder",
    "load_hf_dataset",
    "load_split",
    "make_shapes_dataset",
    "make_shapes_splits",
    "make_video_shapes_dataset",
    "save_sample_grid",
    "shapes_statistics",
    "task_rows",
    "to_rgb",
    "to_pairs",
    "to_schema",
    "validate_row",
]
