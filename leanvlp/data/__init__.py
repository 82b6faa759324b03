"""Data: the one row schema, the embedded shapes dataset, and loaders (COCO folders, any `datasets` set)."""

from .coco import load_coco_folder
from .hf import load_hf_dataset, to_schema
from .schema import FEATURES, SCHEMA, VIDEO_FEATURES, to_rgb, validate_row
from .shapes import (make_shapes_dataset, make_shapes_splits, make_video_shapes_dataset, save_sample_grid,
                     shapes_statistics)
from .webdataset import WebDatasetStateCallback, WebDatasetStream, expand_shards, load_webdataset, webdataset_dataloader

__all__ = [
    "FEATURES",
    "SCHEMA",
    "VIDEO_FEATURES",
    "load_coco_folder",
    "load_hf_dataset",
    "make_shapes_dataset",
    "make_shapes_splits",
    "make_video_shapes_dataset",
    "save_sample_grid",
    "shapes_statistics",
    "to_rgb",
    "to_schema",
    "validate_row",
]
