"""How an image becomes the float tensor a backbone expects: size, resize and normalisation.

The same record travels from the backbone's recipe (timm's ``pretrained_cfg`` or torchvision's
weights meta) through the training transforms into the bundle manifest, where the exported graph
bakes it in so that downstream code never re-implements normalisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Input recipe of an image model.

    input_size: side of the square crop the model sees.
    resize_size: shorter side an image is resized to before the centre crop at validation.
    mean, std: per-channel normalisation of RGB values scaled to [0, 1].
    interpolation: resize filter name (``bilinear`` | ``bicubic`` | ``nearest``).
    """

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    def with_size(self, input_size: int) -> Preprocessing:
        """The same recipe at another input size, keeping the resize/crop ratio."""
        ratio = self.resize_size / self.input_size
        return Preprocessing(input_size, round(input_size * ratio), self.mean, self.std,
                             self.interpolation)
