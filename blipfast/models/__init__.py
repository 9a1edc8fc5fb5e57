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
from .caption import BlipForCaptioning  # noqa: E402
from .retrieval import BlipForRetrieval, BlipRetrievalOutput  # noqa: E402
from .vqa import BlipForVQA  # noqa: E402

__all__ += ["BlipForCaptioning", "BlipForRetrieval", "BlipRetrievalOutput", "BlipForVQA"]
