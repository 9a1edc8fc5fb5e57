"""blipfast: BLIP (Li et al., 2022) rebuilt for speed, held to the original code by parity tests."""
from .config import BlipConfig, ConfigError, TextConfig, VisionConfig
from .models import BlipForPretraining, BlipPretrainOutput

__version__ = "0.1.0"

__all__ = [
    "BlipConfig",
    "BlipForPretraining",
    "BlipPretrainOutput",
    "ConfigError",
    "TextConfig",
    "VisionConfig",
]
