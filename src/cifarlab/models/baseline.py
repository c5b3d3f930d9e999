"""A small VGG-style CNN (~0.29M parameters): the size of a tutorial network, with BatchNorm so it trains well."""

from torch import Tensor, nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class BaselineCNN(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            layers += _conv_bn_relu(in_channels, width) + _conv_bn_relu(width, width) + [nn.MaxPool2d(2)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
