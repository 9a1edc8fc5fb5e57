"""Checkpoint converters: the official BLIP .pth layout and HF transformers' BLIP, both strict.

blipfast's own parameter names are the official layout's, so the official converter mostly
checks keys and shapes; the HF converter renames the vision tower's keys.
"""
from .original import export_original_state_dict, load_original_checkpoint, load_original_state_dict
from .hf import export_hf, load_hf

__all__ = [
    "export_hf",
    "export_original_state_dict",
    "load_hf",
    "load_original_checkpoint",
    "load_original_state_dict",
]
