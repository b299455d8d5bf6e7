"""The digits classifier: a small CNN whose penultimate features serve as an FID-style embedding
for 1x16x16 digit images in [-1, 1]."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ClassifierConfig:
    channels: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128
    num_classes: int = 10
    image_size: int = 16
    architecture: str = "DigitsClassifier"

    def __post_init__(self) -> None:
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise ValueError(f"channels must be three positive ints, got {self.channels}")
        if self.feature_dim < 1 or self.num_classes < 2:
            raise ValueError("feature_dim must be >= 1 and num_classes >= 2")
        if self.image_size % 4:
            raise ValueError("image_size must be divisible by 4")


class DigitsClassifier(nn.Module):
    """conv(c0) -> conv(c1, stride 2) -> conv(c2, stride 2) -> fc(feature_dim) [features] -> fc(classes)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c0, c1, c2 = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c0, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c0, c1, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(c2 * (config.image_size // 4) ** 2, config.feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (N, feature_dim), for x of shape (N, 1, H, W) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save_pretrained(self, path: str | Path) -> None:
        from accelerando._io import save_safetensors
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["channels"] = list(cfg["channels"])
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_safetensors({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                         path / "model.safetensors")


def load_classifier(path: str | Path, *, device: Any = "cpu") -> DigitsClassifier:
    """Load a DigitsClassifier saved by `save_pretrained` (config.json + model.safetensors), in eval mode."""
    from safetensors.torch import load_file
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["channels"] = tuple(cfg["channels"])
    model = DigitsClassifier(ClassifierConfig(**cfg))
    state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.to(device).eval()
