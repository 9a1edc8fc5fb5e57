"""The library surface for using a trained BLIP: one loader for any checkpoint layout, features,
ITC / ITM scores, zero-shot classification and captions.

    import blipfast
    model = blipfast.load("model_base_retrieval_coco.pth", tokenizer="bert-base-uncased/")
    model.itm_score(["cat.jpg"], ["a cat on a sofa", "a dog"])
"""
from .layouts import LayoutError
from .loader import load
from .predictor import ImageFeatures, MultimodalFeatures, Predictor, TextFeatures
from .zero_shot import DEFAULT_TEMPLATES, Classification, ZeroShotClassifier

__all__ = [
    "Classification",
    "DEFAULT_TEMPLATES",
    "ImageFeatures",
    "LayoutError",
    "MultimodalFeatures",
    "Predictor",
    "TextFeatures",
    "ZeroShotClassifier",
    "load",
]
