"""leanvlp: efficient vision-language pretraining, Hugging Face-native.

Importing the package registers every leanvlp model, config and processor with the
transformers Auto classes (see `leanvlp.auto`), so saved folders load with no `trust_remote_code`.
"""

from .auto import AutoEntry, register_all
from .modeling.configuration_merge_bridge import MergeBridgeConfig
from .modeling.modeling_merge_bridge import (
    MergeBridgeForConditionalGeneration,
    MergeBridgeModel,
    MergeBridgePreTrainedModel,
)
from .modeling.configuration_patch_align import PatchAlignConfig
from .modeling.modeling_patch_align import (
    PatchAlignForConditionalGeneration,
    PatchAlignForImageTextRetrieval,
    PatchAlignForPreTraining,
    PatchAlignForQuestionAnswering,
    PatchAlignModel,
    PatchAlignPreTrainedModel,
)
from .modeling.token_merging import TokenMergingConfig
from .modeling.vision_tower import TokenMergingVisionTower
from .processing.processing_merge_bridge import MergeBridgeProcessor
from .processing.processing_patch_align import PatchAlignProcessor

__version__ = "0.2.0"

# One entry per model family.
ENTRIES: list[AutoEntry] = [
    AutoEntry(
        MergeBridgeConfig,
        {"AutoModel": MergeBridgeModel, "AutoModelForImageTextToText": MergeBridgeForConditionalGeneration},
        MergeBridgeProcessor,
    ),
    AutoEntry(
        PatchAlignConfig,
        {
            "AutoModel": PatchAlignModel,
            "AutoModelForPreTraining": PatchAlignForPreTraining,
            "AutoModelForImageTextToText": PatchAlignForConditionalGeneration,
        },
        PatchAlignProcessor,
    ),
]

register_all(ENTRIES)

__all__ = [
    "ENTRIES",
    "AutoEntry",
    "MergeBridgeConfig",
    "MergeBridgeForConditionalGeneration",
    "MergeBridgeModel",
    "MergeBridgePreTrainedModel",
    "MergeBridgeProcessor",
    "PatchAlignConfig",
    "PatchAlignForConditionalGeneration",
    "PatchAlignForImageTextRetrieval",
    "PatchAlignForPreTraining",
    "PatchAlignForQuestionAnswering",
    "PatchAlignModel",
    "PatchAlignPreTrainedModel",
    "PatchAlignProcessor",
    "TokenMergingConfig",
    "TokenMergingVisionTower",
    "__version__",
]
