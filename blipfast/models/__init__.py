from .blip import BlipForPretraining, BlipPretrainOutput
from .med import TextDecoder, TextTransformer
from .vit import VisionTransformer, interpolate_pos_embed

__all__ = [
    "BlipForPretraining",
    "BlipPretrainOutput",
    "TextDecoder",
    "TextTransformer",
    "VisionTransformer",
    "interpolate_pos_embed",
]
