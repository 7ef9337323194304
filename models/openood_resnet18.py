"""OpenOOD v1.5's CIFAR backbone (`openood/networks/resnet18_32x32.py`, ResNet18_32x32), with its parameter names.

A ResNet-18 for 32 x 32 inputs: a 3x3 stride-1 stem without max-pool, four stages of two basic blocks (64, 128,
256, 512 channels; stages 2-4 halve the resolution), average pooling and `fc`. A block's shortcut is a 1x1
convolution and a BatchNorm (`shortcut.0`, `shortcut.1`) where the shape changes, else the identity. OpenOOD saves
`net.state_dict()` as `best.ckpt`, so its files load here as plain state dicts, strictly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        # an empty Sequential is the identity and holds no tensors, as in OpenOOD
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18_32x32(nn.Module):
    """(N, 3, H, W) normalised images -> (N, num_classes) logits; the feature is the pooled 512-d input of `fc`."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_channels = [], 64
        for channels, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(BasicBlock(in_channels, channels, stride),
                                        BasicBlock(channels, channels, 1)))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 512, H/8, W/8)
        features = torch.flatten(self.avgpool(x), 1)                 # (N, 512)
        return self.fc(features)
