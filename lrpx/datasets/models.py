"""Two small models for the ``shapes`` data: a VGG-like and a ResNet-like CNN of standard layers."""
from __future__ import annotations

from torch import Tensor, nn

from .shapes import CLASSES

__all__ = ["ShapesVGG", "ShapesResNet", "BasicBlock", "MODELS"]


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]


class ShapesVGG(nn.Sequential):
    """A small VGG: four Conv-BatchNorm-ReLU stages with max pooling, global pooling, a linear classifier.

    Parameters
    ----------
    num_classes
        Outputs.
    width
        Channels of the first stage (doubled twice).
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 8):
        w = width
        features = [*_conv_bn(3, w), nn.ReLU(), nn.MaxPool2d(2),
                    *_conv_bn(w, 2 * w), nn.ReLU(), nn.MaxPool2d(2),
                    *_conv_bn(2 * w, 4 * w), nn.ReLU(), nn.MaxPool2d(2),
                    *_conv_bn(4 * w, 4 * w), nn.ReLU()]
        classifier = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * w, num_classes)]
        super().__init__(nn.Sequential(*features), nn.Sequential(*classifier))


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BatchNorm layers and a shortcut (a 1x1 Conv-BatchNorm when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ShapesResNet(nn.Module):
    """A small ResNet: a Conv-BatchNorm-ReLU-MaxPool stem, three residual blocks, global pooling.

    Parameters
    ----------
    num_classes
        Outputs.
    width
        Channels of the stem (doubled twice by the blocks).
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn(3, w), nn.ReLU(), nn.MaxPool2d(2))
        self.blocks = nn.Sequential(BasicBlock(w, w), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


MODELS: dict[str, type[nn.Module]] = {"vgg": ShapesVGG, "resnet": ShapesResNet}

