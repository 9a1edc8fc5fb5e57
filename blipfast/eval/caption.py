"""Caption evaluation: generate a caption for every held-out image with a BlipForCaptioning
checkpoint, write them in the original BLIP's result-file format and score them (BLEU-1..4,
CIDEr) against the references.

    python -m blipfast.eval.caption --config configs/tasks/caption_eval.yaml eval.checkpoint=CKPT
    torchrun --nproc_per_node N -m blipfast.eval.caption --config ... [key=value ...]

1. Config: a YAML with `model` (a model YAML path, relative to the config file, or inline),
   `data` (`blipfast.data.DataConfig`: its held-out split, as `build_eval_set` reads it) and
   `eval` (`CaptionEvalConfig` below); dotted `section.key=value` overrides follow the config.
   Loading is strict: unknown keys and bad values print `error: ...` and exit with status 2, as
   does a missing checkpoint file.
2. Generation: `BlipForCaptioning.generate` in batches of eval.batch_size: beam search (the
   original's COCO setting: 3 beams, 5..20 tokens, prompt included) or, with eval.sample,
   nucleus sampling (top_p). Scores match the trainer's end-of-run caption evaluation
   (`blipfast.train.tasks.CaptionTask.evaluate`) for the same model, images and settings.
3. Sharding (WORLD_SIZE > 1): the images are cut into the same batches as with one process and
   each rank takes a contiguous run of whole batches, so every rank generates exactly the
   batches a single process would. The captions are merged after all local work by one
   `all_gather_object` (no collective runs while a rank still generates); rank 0 then holds
   every caption in image order.
4. Sampling seeds: batch [s, s + batch_size) samples with a torch.Generator seeded with
   eval.seed + s. With (2.) this makes the captions independent of the number of ranks; they
   do depend on eval.batch_size (a batch draws its random numbers together).
5. Output (rank 0): eval.output, a JSON list of {"image_id": i, "image": name, "caption": c}
   (i is the image's index in the held-out split, as the original's result files), and a JSON
   summary on stdout: {"scores": {BLEU-1..BLEU-4, CIDEr}, "num_images", "generation_seconds"}
   (the slowest rank's generation time). Scores use `caption_scores` over the images that have
   references ("scores" is left out when none has); as the trainer, an empty generated caption
   is scored as "." (BLEU needs a token), while the result file keeps it empty.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .caption_metrics import caption_scores

__all__ = ["CaptionEvalConfig", "generate_captions", "result_records", "score_captions", "main"]


@dataclass
class CaptionEvalConfig:
    """The `eval:` section of a caption evaluation YAML (configs/tasks/caption_eval.yaml)."""

    checkpoint: str = ""  # BlipForCaptioning weights (official layout .pth or torch.save state dict); required
    init_from_pretrain: bool = False  # the checkpoint holds other weights too (pre-training): extra keys ignored
    batch_size: int = 64  # images per generate call
    num_beams: int = 3  # beam search width (1: greedy); unused when sampling
    max_length: int = 20  # tokens, prompt included (the original's COCO setting)
    min_length: int = 5  # tokens, prompt included
    sample: bool = False  # nucleus sampling instead of beam search
    top_p: float = 0.9  # nucleus mass when sampling
    repetition_penalty: Optional[float] = None  # null: the model's default (1.0 beam search, 1.1 sampling)
    prompt: str = "a picture of "  # decoder prompt, stripped from the output
    seed: int = 0  # sampling seed (see the module docstring)
    max_images: int = 0  # caption only the first N held-out images; 0: all
    output: str = ""  # result file (JSON list of {image_id, image, caption}); "": none
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def validate(self, where: str = "eval") -> None:
        from blipfast.config import ConfigError

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: {key} must be {what}, got {getattr(self, key)!r}")

        need(bool(self.checkpoint), "checkpoint", "set (the BlipForCaptioning weights to evaluate)")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.num_beams >= 1, "num_beams", ">= 1")
        need(self.max_length >= 1, "max_length", ">= 1")
        need(0 <= self.min_length <= self.max_length, "min_length", f"between 0 and max_length ({self.max_length})")
        need(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        need(self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty", "> 0 or null")
        need(self.max_images >= 0, "max_images", ">= 0 (0: all)")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device",
             "auto, cpu, cuda or cuda:N")


@torch.no_grad()
def generate_captions(model, images: torch.Tensor, ev: CaptionEvalConfig, device, start: int = 0,
                      progress=None) -> List[str]:
    """Captions of `images` (the held-out images start .. start + len - 1), batch by batch.

    `start` must be a multiple of ev.batch_size for the batches (and the sampling seeds
    ev.seed + batch start) to be those of a single process."""
    out: List[str] = []
    for s in range(0, images.shape[0], ev.batch_size):
        batch = images[s:s + ev.batch_size].to(device)
        gen = None
        if ev.sample:
            gen = torch.Generator(device=device).manual_seed(ev.seed + start + s)
        out += model.generate(batch, sample=ev.sample, num_beams=ev.num_beams, max_length=ev.max_length,
                              min_length=ev.min_length, top_p=ev.top_p, repetition_penalty=ev.repetition_penalty,
                              generator=gen)
        if progress is not None:
            progress.update(batch.shape[0])
    return out


def result_records(captions: Sequence[str], image_names: Sequence[str]) -> List[Dict]:
    """The original BLIP's result file: [{"image_id", "caption"}], plus the image name."""
    return [{"image_id": i, "image": name, "caption": c} for i, (c, name) in enumerate(zip(captions, image_names))]


def score_captions(captions: Sequence[str], img2txt: Sequence[Sequence[int]],
                   texts: Sequence[str]) -> Optional[Dict[str, float]]:
    """BLEU-1..4 and CIDEr of captions[i] against the texts of image i, over the images with
    references (None if there are none). Empty captions count as "." (as the trainer)."""
    refs = {i: [texts[t] for t in img2txt[i]] for i in range(len(captions)) if len(img2txt[i])}
    if not refs:
        return None
    return caption_scores(refs, {i: [captions[i].strip() or "."] for i in refs})


def _check_lengths(run) -> None:
    from blipfast.config import ConfigError

    if run.eval.max_length > run.model.text.max_position_embeddings:
        raise ConfigError(f"{run.source}: eval.max_length ({run.eval.max_length}) exceeds the model's "
                          f"max_position_embeddings ({run.model.text.max_position_embeddings})")


def main(argv=None) -> int:
    """Caption the held-out split of a data config with a captioning checkpoint; BLEU and CIDEr.

    Under torchrun (WORLD_SIZE > 1) every rank captions a contiguous run of whole batches and
    the captions are merged by one all_gather_object after the local work.
    """
    from blipfast.config import ConfigError

    from . import cli

    p = cli.parser("python -m blipfast.eval.caption", main.__doc__.split("\n\n")[0])
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    try:
        run = cli.load_eval_run(args.config, args.overrides, CaptionEvalConfig)
        _check_lengths(run)
        from blipfast.rundir import load_model
        from blipfast.data import build_eval_set, tokenizer_from_config
        from blipfast.models.caption import BlipForCaptioning

        cfg, ev = run.model, run.eval
        tok = tokenizer_from_config(run.data)
        model = load_model(BlipForCaptioning(cfg, tokenizer=tok, prompt=ev.prompt), ev.checkpoint,
                           ev.init_from_pretrain)
        es = build_eval_set(run.data, tok, cfg.vision.image_size, cfg.max_text_len, batch_size=ev.batch_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # DataError is a ConfigError; bad weights: ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = cli.resolve_device(ev.device)
    rank, world, own = cli.init_distributed(device)
    try:
        model = model.to(device).eval()
        n = es.images.shape[0] if ev.max_images == 0 else min(ev.max_images, es.images.shape[0])
        rows = cli.shard_batches(n, ev.batch_size, rank, world)
        progress = None
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=len(rows), desc=f"captioning (rank 0 of {world})", unit="img", file=sys.stderr,
                            dynamic_ncols=True)
        t0 = time.perf_counter()
        mine = generate_captions(model, es.images[rows.start:rows.stop], ev, device, start=rows.start,
                                 progress=progress)
        seconds = time.perf_counter() - t0
        if progress is not None:
            progress.close()
        captions = cli.gather_in_order(mine, world)  # the only collective, after all local work
        slowest = max(cli.gather_in_order([seconds], world))
        if rank != 0:
            return 0
        assert len(captions) == n, (len(captions), n)
        cli.write_json(result_records(captions, es.image_names[:n]), ev.output)
        summary: Dict = {}
        scores = score_captions(captions, es.img2txt[:n], es.captions)
        if scores is not None:
            summary["scores"] = scores
        summary.update(num_images=n, generation_seconds=slowest)
        print(json.dumps(summary, indent=1))
        return 0
    finally:
        cli.finish(own)


if __name__ == "__main__":
    sys.exit(main())
