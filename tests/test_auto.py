"""The registration mechanism behind `import leanvlp`."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

import leanvlp
from leanvlp.auto import AutoEntry, check_model_folder, load_pretrained, register


class _ToyConfig(PretrainedConfig):
    model_type = "leanvlp_toy_for_tests"

    def __init__(self, width: int = 4, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class _ToyModel(PreTrainedModel):
    config_class = _ToyConfig

    def __init__(self, config: _ToyConfig):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()


def test_register_makes_auto_classes_resolve_and_is_idempotent(tmp_path):
    entry = AutoEntry(_ToyConfig, {"AutoModel": _ToyModel})
    register(entry)
    register(entry)  # a second import must not raise
    _ToyModel(_ToyConfig(width=3)).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, _ToyConfig) and config.width == 3
    assert isinstance(AutoModel.from_pretrained(tmp_path), _ToyModel)


def test_every_shipped_family_is_registered():
    for entry in leanvlp.ENTRIES:
        config = AutoConfig.for_model(entry.config_class.model_type)
        assert type(config) is entry.config_class


def _folder(root, config: dict):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_unknown_model_type_is_named_with_the_folder_and_the_supported_types(tmp_path):
    """A leanvlp folder carries an auto_map: without this check the Auto class asks for remote code."""
    folder = _folder(tmp_path / "m", {"model_type": "patch_allign", "architectures": ["PatchAlignForConditionalGeneration"],
                                      "auto_map": {"AutoConfig": "configuration_patch_align.PatchAlignConfig"}})
    supported = leanvlp.auto.supported_model_types()
    assert {"merge_bridge", "patch_align"} <= set(supported)
    expected = (f"from_pretrained: model_type 'patch_allign' in config.json is not supported (folder {str(folder)!r}, "
                f"supported model types: {supported})")
    with pytest.raises(ValueError) as err:
        check_model_folder(folder)
    assert str(err.value) == expected
    with pytest.raises(ValueError) as err:  # stdin closed: a remote-code prompt would fail differently
        load_pretrained(folder)
    assert str(err.value) == expected
    with pytest.raises(ValueError, match=r"model_type None in config.json is not supported"):
        check_model_folder(_folder(tmp_path / "none", {"hidden_size": 4}))
    with pytest.raises(FileNotFoundError, match=r"config.json is missing \(folder '.*empty'"):
        check_model_folder((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_the_expected_family_and_auto_class_are_checked(tmp_path):
    folder = _folder(tmp_path / "mb", {"model_type": "merge_bridge"})
    assert check_model_folder(folder) == "merge_bridge"
    assert check_model_folder("some-user/some-hub-id") is None  # not a local folder: from_pretrained resolves it
    with pytest.raises(ValueError, match=r"model_type 'merge_bridge' .* supported model types: \['patch_align'\]"):
        check_model_folder(folder, ["patch_align"])  # e.g. training PatchAlign from a MergeBridge checkpoint
    with pytest.raises(ValueError, match=r"auto_class 'AutoModelForPreTraining' has no 'merge_bridge' model .*"
                                         r"provides: \['AutoModel', 'AutoModelForImageTextToText'\]"):
        load_pretrained(folder, "AutoModelForPreTraining")


def test_load_pretrained_loads_a_registered_family(tmp_path):
    register(AutoEntry(_ToyConfig, {"AutoModel": _ToyModel}))
    _ToyModel(_ToyConfig(width=5)).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, "AutoModel")
    assert isinstance(model, _ToyModel) and model.config.width == 5
