"""The registration mechanism behind `import leanvlp`."""

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

import leanvlp
from leanvlp.auto import AutoEntry, register


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
