"""The evaluation preprocessing of a backbone: resize the shorter side, center-crop, normalise."""
from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms

from errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bilinear": transforms.InterpolationMode.BILINEAR,
                  "bicubic": transforms.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class TransformConfig:
    """The evaluation preprocessing a backbone was trained with."""
    resize: int = 256                  # shorter side after resizing, in pixels
    crop: int = 224                    # side of the square center crop; also the model's input size
    interpolation: str = "bilinear"    # resize filter: bilinear | bicubic
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean subtracted after ToTensor
    std: tuple[float, float, float] = IMAGENET_STD    # per-channel std divided by after ToTensor

    def __post_init__(self) -> None:
        for key in ("resize", "crop"):
            if getattr(self, key) < 1:
                raise UserError(f"transform: {key} must be at least 1 pixel, got {getattr(self, key)}")
        if any(value <= 0 for value in self.std):
            raise UserError(f"transform: every std must be positive (it divides the pixels), got {list(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation '{self.interpolation}'; valid: {', '.join(INTERPOLATIONS)}")
        # YAML gives lists; tuples keep the config hashable and its repr stable for cache keys
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    def build(self) -> transforms.Compose:
        """PIL image -> normalised (3, crop, crop) tensor."""
        return transforms.Compose([
            transforms.Resize(self.resize, interpolation=INTERPOLATIONS[self.interpolation]),
            transforms.CenterCrop(self.crop),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])
