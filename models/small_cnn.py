"""A small CNN for tiny grey images, trained at start-up by the offline demo."""
from __future__ import annotations

from torch import Tensor, nn

from models.base import ARCHITECTURES


class SmallCNN(nn.Module):
    """Three 3x3 convolutions and global average pooling -> 128-d features -> `fc` logits."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(128, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.features(images))


@ARCHITECTURES.register("small_cnn")
def _small_cnn(num_classes: int, image_size: int) -> tuple[nn.Module, tuple[str]]:
    return SmallCNN(num_classes), ("fc",)
