"""ViT image encoder (patch 16, CLS token, learned positions, pre-norm blocks).

Parameter names match the official BLIP checkpoint's `visual_encoder.*` keys, so loading is a
copy. Every attention goes through the backend chosen once at construction.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blipfast.config import VisionConfig
from blipfast.ops import resolve_attention


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class VitAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, attn_fn):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.attn_fn = attn_fn

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), strided views
        out = self.attn_fn(q, k, v)  # (B, H, N, D)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def forward_first(self, x):
        """(B, N, C) -> (B, 1, C): the output of the first ([CLS]) row only; its keys and values
        still come from every row, and no query is projected for the others."""
        B, N, C = x.shape
        H, w, b = self.num_heads, self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:C], None if b is None else b[:C]).view(B, 1, H, C // H)  # (B, 1, H, D)
        kv = F.linear(x, w[C:], None if b is None else b[C:]).view(B, N, 2, H, C // H)  # (B, N, 2, H, D)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
        out = self.attn_fn(q.transpose(1, 2), k, v)  # (B, H, 1, D)
        return self.proj(out.transpose(1, 2).reshape(B, 1, C))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, backend={self.attn_fn.name}"


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact erf GELU, as the original
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig, attn_fn, drop_path: float, checkpointed: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VitAttention(cfg, attn_fn)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.checkpointed = checkpointed

    def _forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x):
        if self.checkpointed and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def forward_first(self, x):
        """(B, N, C) -> (B, 1, C): the block's output at the first row only (exact: later rows feed
        it only through keys and values)."""
        x0 = x[:, :1] + self.drop_path(self.attn.forward_first(self.norm1(x)))
        return x0 + self.drop_path(self.mlp(self.norm2(x0)))


class VisionTransformer(nn.Module):
    """(B, 3, S, S) images -> (B, 1 + (S/16)^2, width) tokens after the final LayerNorm."""

    def __init__(self, cfg: VisionConfig, attention_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        attn_fn = resolve_attention(attention_backend)
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # stochastic depth rule
        n_ckpt = cfg.ckpt_layer if cfg.ckpt_layer > 0 else cfg.depth
        self.blocks = nn.ModuleList(
            Block(cfg, attn_fn, dpr[i], cfg.grad_checkpointing and i >= cfg.depth - n_ckpt)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + N, C); first_only: the last block and the final norm compute
        only the [CLS] row, (B, 1, C) (for a caller that reads nothing else, e.g. momentum ITC)."""
        if images.ndim != 4 or images.shape[1] != self.cfg.in_chans:
            raise ValueError(f"images must be (B, {self.cfg.in_chans}, H, W), got {tuple(images.shape)}")
        if images.shape[-1] != self.cfg.image_size or images.shape[-2] != self.cfg.image_size:
            raise ValueError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but the model was built for "
                f"{self.cfg.image_size}x{self.cfg.image_size} (set vision.image_size, positions are "
                f"interpolated when a checkpoint is loaded)"
            )
        x = self.patch_embed(images)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, C)
        x = x + self.pos_embed
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x = blk.forward_first(x) if first_only and i == last else blk(x)
        return self.norm(x)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a (1, 1 + n, C) position table to 1 + num_patches tokens (CLS kept, grid bicubic)."""
    old = pos_embed.shape[1] - 1
    if old == num_patches:
        return pos_embed
    old_side, new_side = int(math.isqrt(old)), int(math.isqrt(num_patches))
    if old_side * old_side != old or new_side * new_side != num_patches:
        raise ValueError(f"cannot interpolate a non-square position grid ({old} -> {num_patches} patches)")
    C = pos_embed.shape[-1]
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, old_side, old_side, C).permute(0, 3, 1, 2)  # (1, C, s, s)
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_patches, C).to(pos_embed.dtype)  # (1, n', C)
    return torch.cat([cls_pos, grid], dim=1)
