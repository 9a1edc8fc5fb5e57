"""Re-draw weights at a scale where attention is sharp, so parity tests can see small errors.

With BERT's init (std 0.02) attention is nearly uniform and a 0.1% change to one attention
weight moves no loss by even 1e-8; with std ~1.5/sqrt(fan_in), LayerNorm gains near 1 and
biases ~0.2 the same change is visible (ENVIRONMENT.md). Plain torch and official parameter
names only, so the blipfast side and the original-code side both import it.
"""
import math

import torch


@torch.no_grad()
def sharpen_(named_params, seed: int, temp: float = 0.09) -> None:
    """Re-draw every tensor of `named_params` ((name, tensor) pairs, shared ones listed once).

    Rules by name and shape: `temp` -> `temp`; `cls_token` / `pos_embed` -> N(0, 1);
    1-dim `*.weight` (the LayerNorm gains) -> 1 + N(0, 0.1^2); 1-dim biases -> N(0, 0.2^2);
    other weights -> N(0, (1.5 / sqrt(fan_in))^2), fan_in = numel / out_features.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in named_params:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "temp":
            p.fill_(temp)
            continue
        if leaf in ("cls_token", "pos_embed"):
            new = torch.randn(p.shape, generator=g)
        elif p.ndim == 1 and leaf == "weight":
            new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif p.ndim == 1:
            new = 0.2 * torch.randn(p.shape, generator=g)
        else:
            fan_in = p[0].numel()
            new = torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(fan_in))
        p.copy_(new)


@torch.no_grad()
def random_queues_(image_queue, text_queue, seed: int) -> None:
    """Unit-norm columns, as the original initialises its (E, Q) feature queues."""
    g = torch.Generator().manual_seed(seed)
    for q in (image_queue, text_queue):
        q.copy_(torch.nn.functional.normalize(torch.randn(q.shape, generator=g), dim=0))
