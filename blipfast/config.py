"""Typed configuration for blipfast, loaded from YAML files in `configs/`.

Every dataclass field carries a comment saying what it is. Loading is strict: an unknown key
raises `ConfigError` naming the key, the section and the file, so a typo never silently
falls back to a default.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration file or override is wrong (unknown key, bad type, bad value)."""


@dataclass
class VisionConfig:
    image_size: int = 224  # input resolution (square); 224 pre-training, 384 fine-tuning
    patch_size: int = 16  # ViT patch size; BLIP uses 16
    width: int = 768  # embedding width: 768 for ViT-B, 1024 for ViT-L
    depth: int = 12  # number of transformer blocks: 12 for ViT-B, 24 for ViT-L
    num_heads: int = 12  # attention heads: 12 for ViT-B, 16 for ViT-L
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks (ViT-L: 0.1)
    layer_norm_eps: float = 1e-6  # the original ViT uses 1e-6 (HF's default 1e-5 is wrong for BLIP)
    qkv_bias: bool = True  # bias on the fused qkv projection
    in_chans: int = 3  # image channels
    grad_checkpointing: bool = False  # activation checkpointing of the last `ckpt_layer` blocks
    ckpt_layer: int = 0  # how many of the last blocks are checkpointed (0 = all when enabled)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, where: str = "vision") -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"{where}: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ConfigError(f"{where}: width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"{where}: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class TextConfig:
    vocab_size: int = 30524  # BERT uncased (30522) + [DEC] + [ENC]
    hidden_size: int = 768  # BERT-base width
    num_hidden_layers: int = 12  # BERT-base depth
    num_attention_heads: int = 12  # BLIP uses 12 (HF's BlipTextConfig default of 8 is a known bug)
    intermediate_size: int = 3072  # feed-forward width
    max_position_embeddings: int = 512  # learned absolute positions
    hidden_dropout_prob: float = 0.1  # dropout after embeddings and each sub-block
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    layer_norm_eps: float = 1e-12  # BERT's post-norm LayerNorm eps
    pad_token_id: int = 0  # [PAD]
    cls_token_id: int = 101  # [CLS]: first token of the unimodal text encoder
    sep_token_id: int = 102  # [SEP]: end of sequence for the decoder
    dec_token_id: int = 30522  # [DEC]: first token of the image-grounded decoder (BOS)
    enc_token_id: int = 30523  # [ENC]: first token of the image-grounded encoder
    encoder_width: int = 0  # width of the image tokens cross-attended to; 0 = the vision width

    def validate(self, where: str = "text") -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{where}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "dec_token_id", "enc_token_id"):
            tok = getattr(self, name)
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"{where}: {name}={tok} is outside the vocabulary (size {self.vocab_size})")


@dataclass
class BlipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)  # the image encoder
    text: TextConfig = field(default_factory=TextConfig)  # the MED text transformer
    embed_dim: int = 256  # ITC projection width
    queue_size: int = 57600  # ITC feature queue length; must be a multiple of the global batch
    momentum: float = 0.995  # EMA rate of the momentum encoders
    alpha: float = 0.4  # momentum-distillation weight (the trainer ramps it up)
    temp: float = 0.07  # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    label_smoothing: float = 0.1  # LM loss label smoothing (the original always uses 0.1)
    max_text_len: int = 30  # tokens per caption in pre-training (padding='max_length')
    attention_backend: str = "auto"  # auto | triton | sdpa | xformers | flash_attn | reference
    loss_backend: str = "auto"  # auto | triton | reference (ITC, hard negatives, LM cross-entropy)
    # Skip work that changes no result: text on real tokens only (packed), cross-attention K/V once
    # per image, LM head on labelled rows, last layers only on the rows a loss reads. false = the
    # original's padded computation (for debugging, and the baseline the benchmarks compare to).
    exact_work: bool = True

    def __post_init__(self) -> None:
        if self.text.encoder_width == 0:
            self.text.encoder_width = self.vision.width

    def validate(self, where: str = "model") -> None:
        self.vision.validate(f"{where}.vision")
        self.text.validate(f"{where}.text")
        if self.queue_size <= 0:
            raise ConfigError(f"{where}: queue_size must be positive, got {self.queue_size}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"{where}: momentum must be in [0, 1], got {self.momentum}")
        if not 0.001 <= self.temp <= 0.5:
            raise ConfigError(f"{where}: temp must be in [0.001, 0.5], got {self.temp}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> "BlipConfig":
        data = load_yaml(path)
        if overrides:
            data = apply_overrides(data, overrides, str(path))
        cfg = from_dict(cls, data, where=str(path))
        cfg.validate(str(path))
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# strict dict -> dataclass loading


def load_yaml(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [(_coerce(arg, v, f"{where}[{i}]") if arg is not Any else v) for i, v in enumerate(value)]
    if origin is dict or tp in (dict, Any):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads '1e-6' (no dot) as a string: accept numeric strings.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: Mapping[str, Any], where: str = "config"):
    """Build dataclass `cls` from `data`, rejecting unknown keys with the key, section and file."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}: {cls.__name__}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ('a.b.c', parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (for example train.epochs=3)")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        where = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML{where}; quote strings with braces or colons, "
            f"e.g. '{key.strip()}=[\"d/{{000..009}}.tar\"]'") from None


def parse_overrides(texts) -> dict:
    """`key=value` arguments -> {key: value}. A key given twice is an error: it is what the shell
    makes of an unquoted brace pattern (data.shards=[d/{000..009}.tar] becomes ten arguments)."""
    out: dict = {}
    seen: dict = {}
    for text in texts:
        key, value = parse_override(text)
        if key in out:
            raise ConfigError(
                f"override {key!r} is given {sum(1 for t in texts if t.split('=', 1)[0].strip() == key)} times "
                f"({seen[key]!r}, {text!r}, ...): if you wrote a brace pattern such as "
                f"{key}=[d/{{000..009}}.tar], the shell expanded it; quote the argument: '{key}=[...]'")
        out[key], seen[key] = value, text
    return out


def apply_overrides(data: dict, overrides: Mapping[str, Any], where: str) -> dict:
    """Return a copy of `data` with dotted-key overrides applied (the keys are checked later)."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{where}: override {dotted!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------
# sectioned run files (train, eval and CapFilt YAMLs): one loader for all three


def resolve_path(value: str, base_dir: str) -> str:
    """A path as given (relative to the working directory), else relative to the config's folder."""
    if os.path.isabs(value) or os.path.exists(value):
        return value
    alt = os.path.join(base_dir, value)
    return alt if os.path.exists(alt) else value


def split_sections(raw: Mapping[str, Any], overrides: Mapping[str, Any], sections, path: str,
                   required=()) -> tuple:
    """Check a run file's top-level keys and sort dotted overrides by section.

    Returns (whole, by_section): `whole` holds overrides of a whole top-level key (`task=...`,
    `model=PATH`), `by_section[s]` the `s.X=...` ones as {X: value}. Unknown top-level keys in the
    file or in an override, and missing required sections, raise ConfigError naming the file.
    """
    sections = tuple(sections)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(sections)}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {', '.join(missing)}")
    whole: dict = {}
    by_section: dict = {k: {} for k in sections}
    for key, value in overrides.items():
        top, _, rest = key.partition(".")
        if top not in sections:
            raise ConfigError(f"override {key!r}: unknown section {top!r}; valid: {', '.join(sections)}")
        if rest:
            by_section[top][rest] = value
        else:
            whole[top] = value
    return whole, by_section


def load_section(cls, value: Any, overrides: Mapping[str, Any], where: str, validate_where: str | None = None):
    """One section of a run file as dataclass `cls`: overrides applied, strict keys, validated
    (`cls.validate(validate_where or where)`, when it has one)."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    cfg = from_dict(cls, apply_overrides(dict(value), overrides, where), where=where)
    if hasattr(cfg, "validate"):
        cfg.validate(validate_where or where)
    return cfg


def model_section(value: Any, base_dir: str, where: str) -> tuple:
    """A run file's `model`: a mapping, a model YAML, a run YAML naming one, or a training output
    directory (its config.yaml). Returns (mapping, where it came from)."""
    if isinstance(value, Mapping):
        return dict(value), where
    if not isinstance(value, str):
        raise ConfigError(f"{where}: a model must be a path to a model YAML or a mapping, got {value!r}")
    path = resolve_path(value, base_dir)
    if os.path.isdir(path):
        path = os.path.join(path, "config.yaml")
    data = load_yaml(path)
    if isinstance(data.get("model"), (Mapping, str)):  # a run YAML or a run's config.yaml
        return model_section(data["model"], os.path.dirname(os.path.abspath(path)), path)
    return data, path


def load_model_section(value: Any, base_dir: str, where: str, overrides: Mapping[str, Any]) -> "BlipConfig":
    raw, src = model_section(value, base_dir, where)
    return load_section(BlipConfig, raw, overrides, src)
