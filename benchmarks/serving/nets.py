"""The networks the serving benchmarks measure: the two the project's configs build (configs/model/), and a null
network that costs next to nothing, for measuring everything around the model."""

from torch import Tensor, nn

from cifarlab.models.airbench import AirbenchNet
from cifarlab.models.module import ClassifierNet
from cifarlab.models.resnet import ResNet18


class NullBackbone(nn.Module):
    """Ten of the input's values as the logits: a valid model of the contract with no compute to speak of."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :10]


NETS = {"airbench": lambda: AirbenchNet(widths=(64, 256, 256)), "resnet18": ResNet18, "null": NullBackbone}


def build(name: str) -> ClassifierNet:
    """uint8 NHWC in, logits out: the function the project exports. Untrained weights (speed does not care)."""
    return ClassifierNet(NETS[name]()).eval()
