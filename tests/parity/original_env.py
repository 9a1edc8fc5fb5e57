"""Build the ORIGINAL BLIP models (PyPI blip-vit) from a blipfast config, offline.

Runs only under the reference venv's python (transformers 4.x, timm 0.4.12, package `blip`).
The original constructors fetch DeiT weights and the bert-base-uncased tokenizer and weights
from hubs; here those loaders are replaced for the duration of a build:

* `create_vit` sizes the ViT from the config (the original only knows 'base' / 'large');
* `torch.hub.load_state_dict_from_url` returns an empty state dict;
* `BertModel.from_pretrained` / `BertLMHeadModel.from_pretrained` build from the config;
* `init_tokenizer` returns `FixedTokenizer`, which hands out the token ids the test chose
  (BLIP tokenizes captions inside forward; the ids are what matter for parity);
* `write_med_config` writes the BERT json the constructors read.

Nothing of the original's math is replaced.
"""
import contextlib
import io
import json
import os

import torch
import torch.distributed as dist
from transformers import BatchEncoding


class FixedTokenizer:
    """Stands in for BLIP's BertTokenizer (+[DEC], +[ENC]): each call on a list of captions
    returns the next of `self.batches`, padded to `max_length` as `padding='max_length'` would;
    a single string (a prompt) gives `prompt_ids`. Special-token ids are the config's."""

    def __init__(self, text_cfg: dict, prompt_ids=None):
        self.vocab_size = text_cfg["vocab_size"]
        self.batches = []  # (input_ids (B, L), attention_mask (B, L)) per upcoming call, in order
        # what a single string (BLIP_Decoder's prompt, tokenised once at construction) encodes to
        self.prompt_ids = list(prompt_ids or [text_cfg["cls_token_id"], text_cfg["sep_token_id"]])
        self.pad_token_id = text_cfg["pad_token_id"]
        self.cls_token_id = text_cfg["cls_token_id"]
        self.sep_token_id = text_cfg["sep_token_id"]
        self.bos_token_id = text_cfg["dec_token_id"]
        self.enc_token_id = text_cfg["enc_token_id"]

    def __len__(self):
        return self.vocab_size

    def __call__(self, text, padding=None, truncation=None, max_length=None, return_tensors=None):
        if isinstance(text, str):
            return BatchEncoding({"input_ids": list(self.prompt_ids)})
        if not self.batches:
            raise RuntimeError("the original code tokenised more often than the test prepared for")
        ids, mask = self.batches.pop(0)
        if len(text) != ids.shape[0]:
            raise ValueError(f"{len(text)} captions but the test prepared {ids.shape[0]} rows of ids")
        if padding == "max_length" and max_length is not None:
            if ids.shape[1] > max_length:
                raise ValueError(f"test ids of length {ids.shape[1]} would be truncated to {max_length}")
            extra = max_length - ids.shape[1]
            ids = torch.cat([ids, ids.new_full((ids.shape[0], extra), self.pad_token_id)], dim=1)
            mask = torch.cat([mask, mask.new_zeros((mask.shape[0], extra))], dim=1)
        return BatchEncoding({"input_ids": ids.clone(), "attention_mask": mask.clone()})


def init_process_group(workdir: str) -> None:
    """The original's queue update all-gathers unconditionally: give it a 1-process gloo group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="file://" + os.path.join(workdir, "pg_store"),
                                rank=0, world_size=1)


def write_med_config(text_cfg: dict, path: str) -> str:
    """BERT/MED config json for the original `BertConfig.from_json_file`."""
    cfg = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": text_cfg["attention_probs_dropout_prob"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": text_cfg["hidden_dropout_prob"],
        "hidden_size": text_cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": text_cfg["intermediate_size"],
        "layer_norm_eps": text_cfg["layer_norm_eps"],
        "max_position_embeddings": text_cfg["max_position_embeddings"],
        "model_type": "bert",
        "num_attention_heads": text_cfg["num_attention_heads"],
        "num_hidden_layers": text_cfg["num_hidden_layers"],
        "pad_token_id": text_cfg["pad_token_id"],
        "type_vocab_size": 2,
        "vocab_size": text_cfg["vocab_size"],
        # The official med_config.json has the text width here (768); every model but VQA's
        # answer decoder overwrites it with the vision width.
        "encoder_width": text_cfg["hidden_size"],
        "add_cross_attention": True,
    }
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


@contextlib.contextmanager
def offline_builders(cfg: dict, prompt_ids=None):
    """Replace the original's hub loaders (see the module docstring) while building a model."""
    import blip.models.blip as blip_mod
    import blip.models.blip_pretrain as pretrain_mod
    import blip.models.blip_retrieval as retrieval_mod
    import blip.models.blip_vqa as vqa_mod
    from blip.models.med import BertLMHeadModel, BertModel
    from blip.models.vit import VisionTransformer

    vc, tc = cfg["vision"], cfg["text"]
    if abs(vc["layer_norm_eps"] - 1e-6) > 1e-12:
        raise ValueError("the original ViT hard-codes LayerNorm eps 1e-6")

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        # drop_path_rate comes from the config (0 in parity tests), not from the caller (VQA: 0.1)
        model = VisionTransformer(
            img_size=image_size, patch_size=vc["patch_size"], embed_dim=vc["width"], depth=vc["depth"],
            num_heads=vc["num_heads"], mlp_ratio=vc["mlp_ratio"], qkv_bias=vc["qkv_bias"],
            use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
            drop_path_rate=vc["drop_path_rate"],
        )
        return model, vc["width"]

    modules = [blip_mod, pretrain_mod, retrieval_mod, vqa_mod]  # each imported the names
    saved = [(m, m.create_vit, m.init_tokenizer) for m in modules]
    saved_hub = torch.hub.load_state_dict_from_url
    bert_classes = (BertModel, BertLMHeadModel)
    saved_fp = [c.__dict__.get("from_pretrained") for c in bert_classes]  # None: inherited
    try:
        for m in modules:
            m.create_vit = create_vit
            m.init_tokenizer = lambda: FixedTokenizer(tc, prompt_ids)
        torch.hub.load_state_dict_from_url = lambda *a, **k: {"model": {}}
        for c in bert_classes:
            c.from_pretrained = classmethod(lambda cls, name, config=None, **kw: cls(config, **kw))
        yield
    finally:
        for m, cv, it in saved:
            m.create_vit, m.init_tokenizer = cv, it
        torch.hub.load_state_dict_from_url = saved_hub
        for c, fp in zip(bert_classes, saved_fp):
            if fp is None:
                del c.from_pretrained
            else:
                c.from_pretrained = fp


def build(kind: str, cfg: dict, workdir: str, prompt_ids=None, **kw):
    """The original model of `kind` (pretrain | retrieval | caption | vqa) sized by blipfast
    config dict `cfg` (BlipConfig.to_dict()); `kw` goes to its constructor; `prompt_ids`: what
    the captioner's prompt tokenises to."""
    from blip.models.blip import BLIP_Decoder
    from blip.models.blip_pretrain import BLIP_Pretrain
    from blip.models.blip_retrieval import BLIP_Retrieval
    from blip.models.blip_vqa import BLIP_VQA

    med = write_med_config(cfg["text"], os.path.join(workdir, "med_config.json"))
    common = dict(med_config=med, image_size=cfg["vision"]["image_size"], vit="base")
    itc = dict(embed_dim=cfg["embed_dim"], queue_size=cfg["queue_size"], momentum=cfg["momentum"])
    make = {
        "pretrain": lambda: BLIP_Pretrain(**common, **itc, **kw),
        "retrieval": lambda: BLIP_Retrieval(**common, **itc, **kw),
        "caption": lambda: BLIP_Decoder(**common, **kw),
        "vqa": lambda: BLIP_VQA(**common, **kw),
    }[kind]
    with offline_builders(cfg, prompt_ids), contextlib.redirect_stdout(io.StringIO()):  # pre-training prints every tie
        return make()
