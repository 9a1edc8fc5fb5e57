"""blipfast: BLIP (Li et al., 2022) rebuilt for speed, held to the original code by parity tests."""
from .config import BlipConfig, ConfigError, TextConfig, VisionConfig
from .models import BlipForPretraining, BlipPretrainOutput

__version__ = "0.1.0"


def load(path_or_dir, task=None, **kw):
    """Any BLIP checkpoint (official .pth, HF directory, blipfast export, training output
    directory) -> a `blipfast.api.Predictor`; see `blipfast.api.load` for the arguments."""
    from .api import load as _load  # imported on use: `import blipfast` stays light

    return _load(path_or_dir, task, **kw)


__all__ = [
    "BlipConfig",
    "BlipForPretraining",
    "BlipPretrainOutput",
    "ConfigError",
    "TextConfig",
    "VisionConfig",
    "load",
]
