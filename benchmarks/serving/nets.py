"""The two networks the serving benchmark measures, as the project's configs build them (configs/model/)."""

from cifarlab.models.airbench import AirbenchNet
from cifarlab.models.module import ClassifierNet
from cifarlab.models.resnet import ResNet18

NETS = {"airbench": lambda: AirbenchNet(widths=(64, 256, 256)), "resnet18": ResNet18}


def build(name: str) -> ClassifierNet:
    """uint8 NHWC in, logits out: the function the project exports. Untrained weights (speed does not care)."""
    return ClassifierNet(NETS[name]()).eval()
