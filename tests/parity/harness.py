"""blipfast side of the parity harness: the reference venv, jobs, blipfast's own steps, comparison.

The original code needs transformers 4.x and timm, so it runs in its own venv
(`.venv-ref`, or the python named by BLIPFAST_REF_PYTHON) through `run_original.py` (or
`run_original_tasks_inference.py`), started as `python -m tests.parity.<script>` from the
repository root; jobs and results travel as torch.save files. Keep subprocess calls few: each
costs ~7 s of imports.
"""
from __future__ import annotations

import math
import os
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from tests.helpers import REPO, random_queues_, rel_err, repo_env, sharpen_

ADAMW = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}


def ref_python() -> str:
    return os.environ.get("BLIPFAST_REF_PYTHON") or os.path.join(REPO, ".venv-ref", "bin", "python")


def require_reference() -> str:
    """The reference python, or skip (fail under CI, where parity must run) with the reason."""
    py = ref_python()
    if os.path.isfile(py) and os.access(py, os.X_OK):
        return py
    msg = (f"the original BLIP code's venv is missing ({py}); build it as ENVIRONMENT.md / .ci/run "
           f"do, or point BLIPFAST_REF_PYTHON at its python")
    if os.environ.get("CI"):
        pytest.fail("parity tests must run in CI: " + msg, pytrace=False)
    pytest.skip(msg)


def run_reference(jobs: Dict[str, dict], workdir: str, timeout: float = 600,
                  script: str = "tests.parity.run_original") -> Dict[str, dict]:
    """Run the original-code `script` (a module of tests/parity) once on all `jobs`; return its
    results keyed by job name."""
    py = require_reference()
    jobs_path, results_path = os.path.join(workdir, "jobs.pt"), os.path.join(workdir, "results.pt")
    torch.save(jobs, jobs_path)
    proc = subprocess.run([py, "-m", script, jobs_path, results_path], capture_output=True, text=True,
                          timeout=timeout, env=repo_env(PYTHONWARNINGS="ignore"), cwd=REPO)
    if proc.returncode != 0 or not os.path.isfile(results_path):
        raise RuntimeError(f"the original code failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return torch.load(results_path, map_location="cpu", weights_only=True)


def job_result(results: Dict[str, dict], name: str) -> dict:
    res = results[name]
    if "error" in res:
        pytest.fail(f"original-code job {name!r} failed:\n{res['error']}", pytrace=False)
    return res


# -- inputs and weights -----------------------------------------------------------------------


def odd_config(image_size: int = 48, attention_backend: str = "reference"):
    """Shapes that are not powers of two: ViT 72 wide / 3 heads (d=24), text 60 / 5 heads (d=12),
    FFN 100, vocabulary 102; dropout 0; room for the original's 30- and 35-token padding.
    Backends are named (not 'auto'): the models run on CPU tensors even where CUDA exists."""
    from blipfast import BlipConfig, TextConfig, VisionConfig

    return BlipConfig(
        vision=VisionConfig(image_size=image_size, patch_size=16, width=72, depth=2, num_heads=3),
        text=TextConfig(vocab_size=102, hidden_size=60, num_hidden_layers=2, num_attention_heads=5,
                        intermediate_size=100, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0, cls_token_id=1, sep_token_id=2,
                        dec_token_id=100, enc_token_id=101),
        embed_dim=24, queue_size=20, attention_backend=attention_backend, loss_backend="reference",
    )


def base_width_config(attention_backend: str = "sdpa"):
    """BERT-base / ViT-B/16 widths (768, 12 heads, FFN 3072, vocab 30524) at depth 1, 64 px."""
    from blipfast import BlipConfig, TextConfig, VisionConfig

    return BlipConfig(
        vision=VisionConfig(image_size=64, patch_size=16, width=768, depth=1, num_heads=12),
        text=TextConfig(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        embed_dim=256, queue_size=8, attention_backend=attention_backend, loss_backend="reference",
    )


def sharpen_model_(model, seed: int, queue_ptr: int = 0, temp: float = 0.09) -> None:
    """Every parameter re-drawn at a sharp scale (momentum copies independently of the online
    ones, so the momentum update is visible), unit-norm random queues, a chosen queue pointer."""
    sharpen_(model, seed, temp=temp, momentum="draw")
    if hasattr(model, "image_queue"):
        random_queues_(model.image_queue, model.text_queue, seed + 1)
        ptr = model.queue_ptr if hasattr(model, "queue_ptr") else model.ptr_queue  # retrieval's name
        ptr.fill_(queue_ptr)


@torch.no_grad()
def quiet_vit_input_(model, scale: float = 3e-3) -> None:
    """Shrink what enters the first ViT LayerNorm (CLS token, positions, patch bias; images are
    scaled by `make_batch(image_scale=)`) so its variance is ~1e-5 and the LayerNorm eps (1e-6 in
    the original, 1e-5 in HF) changes the outputs far beyond the tolerances."""
    for enc in (model.visual_encoder, getattr(model, "visual_encoder_m", None)):
        if enc is not None:
            for p in (enc.cls_token, enc.pos_embed, enc.patch_embed.proj.bias):
                p.mul_(scale)


def make_text(cfg, lengths: Sequence[int], generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT-style (ids, mask): [CLS] w_1 .. w_{n-2} [SEP] then [PAD]s, one row per length."""
    tc = cfg.text
    B, L = len(lengths), max(lengths)
    special = {tc.pad_token_id, tc.cls_token_id, tc.sep_token_id, tc.dec_token_id, tc.enc_token_id}
    words = torch.tensor([t for t in range(tc.vocab_size) if t not in special])
    ids = torch.full((B, L), tc.pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n - 1] = tc.cls_token_id, tc.sep_token_id
        ids[b, 1:n - 1] = words[torch.randint(len(words), (n - 2,), generator=generator)]
        mask[b, :n] = 1
    return ids, mask


def make_batch(cfg, lengths: Sequence[int], seed: int, image_scale: float = 1.0) -> dict:
    """Images N(0, image_scale^2) and one text per length (see make_text)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = make_text(cfg, lengths, g)
    S = cfg.vision.image_size
    images = image_scale * torch.randn(len(lengths), 3, S, S, generator=g)
    # texts: what the original's tokenizer calls return, in call order (see run_original.py)
    return {"images": images, "input_ids": ids, "attention_mask": mask, "texts": [(ids, mask)]}


# -- blipfast's side of a job -----------------------------------------------------------------


def _forward(kind: str, model, batch: dict, alpha: float, negatives):
    """blipfast's forward of `kind`; returns ({loss name: loss}, {output name: tensor})."""
    images = batch["images"]
    if kind == "pretrain":
        out = model(images, batch["input_ids"], batch["attention_mask"], alpha, negatives=negatives)
        losses = {"loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_lm": out.loss_lm}
    elif kind == "retrieval":
        out = model(images, batch["input_ids"], batch["attention_mask"], alpha, batch["idx"], negatives=negatives)
        losses = {"loss_itc": out.loss_itc, "loss_itm": out.loss_itm}
    elif kind == "caption":
        return {"loss_lm": model(images, batch["input_ids"], batch["attention_mask"],
                                 prompt_length=batch["prompt_length"])}, {}
    elif kind == "vqa":
        (q_ids, q_mask), (a_ids, a_mask) = batch["texts"]
        return {"loss_vqa": model(images, q_ids, q_mask, a_ids, a_mask, batch["n"], batch["weights"])}, {}
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    outputs = {"image_feat": out.image_feat, "text_feat": out.text_feat, "itm_logits": out.itm_logits}
    return losses, {k: v.detach() for k, v in outputs.items()}


@torch.no_grad()
def _sampling_weights(kind: str, model, batch: dict, outputs: dict) -> dict:
    """The hard-negative sampling weights, from blipfast's features (compared with the rows the
    original passed to torch.multinomial)."""
    from blipfast.kernels import reference as ref

    temp = model.temp.detach().clamp(0.001, 0.5)
    img, txt = outputs["image_feat"], outputs["text_feat"]
    if kind == "pretrain":  # online features against the momentum in-batch features
        img_m = model.image_features(model.visual_encoder_m(batch["images"]), momentum=True)
        txt_m = model.text_features(batch["input_ids"], batch["attention_mask"], momentum=True)
        return {"weights_t2i": ref.hard_negative_weights(txt @ img_m.T / temp),
                "weights_i2t": ref.hard_negative_weights(img @ txt_m.T / temp)}
    idx = batch["idx"].reshape(-1)  # retrieval: online against online, same image id excluded
    return {"weights_t2i": ref.retrieval_negative_weights(txt @ img.T / temp, idx, idx),
            "weights_i2t": ref.retrieval_negative_weights(img @ txt.T / temp, idx, idx)}


def run_blipfast_steps(model, batches: List[dict], negatives: List[Optional[Tuple[torch.Tensor, torch.Tensor]]],
                       alpha: float = 0.0, adamw: dict = ADAMW, kind: str = "pretrain") -> List[dict]:
    """The steps `run_original.py` runs, with the original's hard negatives replayed."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=adamw["lr"], betas=tuple(adamw["betas"]), eps=adamw["eps"],
                            weight_decay=adamw["weight_decay"])
    steps = []
    for i, (batch, neg) in enumerate(zip(batches, negatives)):
        seen = {}

        def record(module, args, output):  # returns None: the output itself is left alone
            seen.setdefault("image_embeds", output.detach().clone())

        handle = model.visual_encoder.register_forward_hook(record)
        losses, outputs = _forward(kind, model, batch, alpha, neg)
        handle.remove()
        step = {**{k: v.detach() for k, v in losses.items()}, **outputs, **seen}
        if neg is not None:
            step.update(_sampling_weights(kind, model, batch, outputs))
        sum(losses.values()).backward()
        if i == 0:
            step["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if i + 1 < len(batches):
            opt.step()
            opt.zero_grad(set_to_none=True)
            step["params_after_opt"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        step["momentum"] = {k: v.detach().clone() for k, v in model.state_dict().items()
                            if k.split(".")[0].endswith("_m")}
        step["buffers"] = {k: v.detach().clone() for k, v in model.named_buffers() if "queue" in k}
        steps.append(step)
    return steps


def negatives_of(ref_step: dict) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    if "neg_image_for_text" not in ref_step:
        return None
    return ref_step["neg_image_for_text"].long(), ref_step["neg_text_for_image"].long()


# -- comparison -------------------------------------------------------------------------------


def _describe(ours: torch.Tensor, ref: torch.Tensor, err: float) -> str:
    if ours.numel() != ref.numel():
        return f"shape {tuple(ours.shape)} vs original {tuple(ref.shape)}"
    o, r = ours.detach().double().reshape(ref.shape), ref.detach().double()
    bad = torch.isfinite(o) != torch.isfinite(r)
    if bad.any():
        at = tuple(int(i) for i in bad.nonzero()[0])
        return f"NaN/inf in one side only, first at {at} (blipfast {o[at].item()}, original {r[at].item()})"
    diff = (o - r).abs()
    at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.ndim else ()
    return (f"rel {err:.3e}, max abs {diff.max().item():.3e} at {at} "
            f"(blipfast {o[at].item():.6g}, original {r[at].item():.6g})")


def compare(ours: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], tol: float, what: str,
            floor_frac: Optional[float] = None, top: int = 6) -> Dict[str, float]:
    """Per-name relative errors; fails naming the worst tensors and any missing / extra names.

    floor_frac: denominators are at least floor_frac * (norm of all of `ref` together), for
    tensors that are zero in exact arithmetic (attention key-bias gradients: softmax ignores a
    per-row shift), whose own norm is pure rounding noise.
    """
    if ours.keys() != ref.keys():
        pytest.fail(f"{what}: names differ; only blipfast: {sorted(ours.keys() - ref.keys())[:20]}; "
                    f"only original: {sorted(ref.keys() - ours.keys())[:20]}", pytrace=False)
    floor = 0.0
    if floor_frac is not None:
        floor = floor_frac * math.sqrt(sum(v.double().norm().item() ** 2 for v in ref.values()))
    errs = {k: rel_err(ours[k], ref[k], floor) for k in ref}
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:top]
    if worst and worst[0][1] > tol:
        lines = [f"  {k}: " + _describe(ours[k], ref[k], e) for k, e in worst]
        pytest.fail(f"{what}: relative error above {tol:g} in {sum(e > tol for e in errs.values())} of "
                    f"{len(errs)} tensors; worst:\n" + "\n".join(lines), pytrace=False)
    return errs


def key_bias_entries(name: str, shape) -> Optional[torch.Tensor]:
    """Bool mask of the entries of parameter `name` whose gradient is zero in exact arithmetic:
    attention key biases (a shift of every score of a query row, which softmax ignores). AdamW's
    first step is ~lr * sign(grad), so there the two codes take different (harmless) steps."""
    if name.endswith("self.key.bias"):
        return torch.ones(shape, dtype=torch.bool)
    if name.endswith("attn.qkv.bias"):  # ViT: fused (q | k | v) bias
        mask = torch.zeros(shape, dtype=torch.bool)
        C = shape[0] // 3
        mask[C:2 * C] = True
        return mask
    return None
