"""The Annotated ResNet: every network of He et al. (2015), built from the paper's concepts."""

from .architecture import count_multiply_adds, count_parameters, stage_output_shapes, table1
from .model import (
    MODEL_NAMES,
    BasicBlock,
    Bottleneck,
    ResNet,
    ZeroPadShortcut,
    cifar_resnet,
    create_model,
    imagenet_resnet,
)

__all__ = [
    "MODEL_NAMES", "BasicBlock", "Bottleneck", "ResNet", "ZeroPadShortcut", "cifar_resnet",
    "create_model", "imagenet_resnet", "count_multiply_adds", "count_parameters",
    "stage_output_shapes", "table1",
]
