"""Bad input across the seams: the one box rule gives the loader and the processor the same box (#18)."""

import json

import PIL.Image
import pytest
from transformers import BertTokenizer, ViTImageProcessorPil

from leanvlp.data import load_coco_folder
from leanvlp.processing.processing_patch_align import PatchAlignProcessor

# The worked numbers of tests/test_boxes.py (64x64 image)
WITHIN = [-0.25, 10.0, 20.0, 54.375]  # 0.25 px out on the left, 0.375 px out at the bottom: clipped
WITHIN_CLIPPED = [0.0, 10.0, 19.75, 54.0]
BEYOND = [50.0, 10.0, 14.625, 5.0]  # 0.625 px out on the right: rejected


def coco_folder(root, bbox: list[float]):
    """A one-image COCO folder (64x64 PNG, one caption, one 'circle' box)."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    PIL.Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "val2017" / "7.png")
    image = {"id": 7, "file_name": "7.png", "width": 64, "height": 64}
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(
        {"images": [image], "annotations": [{"id": 1, "image_id": 7, "caption": "a red circle"}]}))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": [image], "categories": [{"id": 3, "name": "circle"}],
         "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": bbox}]}))
    return root


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "a", "red", "circle"]))
    return PatchAlignProcessor(ViTImageProcessorPil(size={"height": 32, "width": 32}), BertTokenizer(str(vocab)),
                               patch_size=8, object_classes=["circle"])


def test_box_within_the_tolerance_is_the_same_box_in_the_loader_and_the_processor(tmp_path, processor):
    row = load_coco_folder(coco_folder(tmp_path, WITHIN), split="val2017")[0]
    assert row["boxes"] == [WITHIN_CLIPPED]
    image = PIL.Image.new("RGB", (64, 64))
    raw = processor(images=[image], text=["a red circle"], boxes=[[WITHIN]], box_labels=[["circle"]])
    loaded = processor(images=[image], text=["a red circle"], boxes=[row["boxes"]], box_labels=[row["box_labels"]])
    # 64 -> 32 px: x [0, 9.875), y [5, 32) on 8 px patches of a 4x4 grid = columns 0-1, rows 0-3
    assert raw["patch_labels"][0].nonzero().flatten().tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    assert raw["class_labels"][0].tolist() == [0, 0, 1, 1] * 4  # class 0 = circle, 1 = background
    for key in ("patch_labels", "pta_mask", "class_labels"):
        assert raw[key].equal(loaded[key]), key


def test_box_beyond_the_tolerance_is_rejected_by_both_naming_it(tmp_path, processor):
    with pytest.raises(ValueError) as err:
        load_coco_folder(coco_folder(tmp_path, BEYOND), split="val2017")
    assert str(err.value).startswith("load_coco_folder: boxes[0] lies outside the 64x64 image by 0.625 px (tolerance "
                                     f"0.5 px) (sample '7', value {BEYOND})")
    with pytest.raises(ValueError, match=r"boxes\[0\]\[0\] lies outside the 64x64 image by 0.625 px \(tolerance 0.5 px\)"
                                         r" \(value \[50.0, 10.0, 14.625, 5.0\], xywh\)"):
        processor(images=[PIL.Image.new("RGB", (64, 64))], text=["a red circle"], boxes=[[BEYOND]],
                  box_labels=[["circle"]])


@pytest.mark.parametrize("family", ["merge_bridge", "patch_align"])
def test_fine_tuning_a_checkpoint_of_another_model_type_names_it_before_loading(tmp_path, family):
    from leanvlp.training.arguments import ModelArguments
    from leanvlp.training.models import AnnotationVocab, build_merge_bridge, build_patch_align

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "patch_allign"}))
    args = ModelArguments(checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match=rf"model_type 'patch_allign' .*{tmp_path.name}.*\['{family}'\]"):
        if family == "merge_bridge":
            build_merge_bridge(args, ["a"])
        else:
            build_patch_align(args, "pretrain", ["a"], AnnotationVocab([], [], 0))
