"""CapFilt: bootstrap a caption dataset with a captioner and a filter (BLIP, section 3).

For every image of the input data: the captioner (a fine-tuned `BlipForCaptioning`) writes
`num_synthetic` captions by nucleus sampling (top-p 0.9, repetition penalty 1.1, 10 to 30 tokens
with the prompt "a picture of ", as the original's `generate(sample=True)`); the filter (a
fine-tuned `BlipForRetrieval`) scores the original caption(s) and the synthetic ones with its
ITM head; a caption is kept when p(match) >= threshold (0.5 = the original's argmax rule).

    python -m blipfast.capfilt --config configs/tasks/capfilt.yaml [key=value ...]
        [--rank R --world-size W] [--merge-only]

Work is split into units of `chunk_size` images; unit u belongs to rank u mod W (ranks come from
--rank/--world-size or the RANK/WORLD_SIZE variables torchrun and deepspeed set; no process group
is needed). Each finished unit is written to out_dir/parts/ with a `.done` marker; a rerun skips
finished units, and the random stream of a unit depends only on (seed, unit), so results do not
depend on the number of ranks or on restarts. Rank 0 then waits for every marker and merges:

    out_dir/capfilt.json     kept pairs as a BLIP annotation list {"image", "caption", "source"}
                             (JSON input; absolute image paths), readable by the trainer
    out_dir/shards/*.tar     kept pairs as webdataset shards, one sample per pair (webdataset input)
    out_dir/candidates.json  every candidate with its p(match): re-threshold without recomputing
    out_dir/summary.json     kept / dropped counts per source (original, synthetic)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from blipfast.atomic import atomic_open, atomic_write_json
from blipfast.rundir import load_model, load_state  # noqa: F401  (re-exported: blipfast.capfilt.load_model)
from blipfast.config import (BlipConfig, ConfigError, load_model_section, load_section, load_yaml, parse_overrides,
                             resolve_path, split_sections)

SOURCES = ("original", "synthetic")


@dataclass
class CapfiltConfig:
    captioner: str = ""  # captioner checkpoint: a BlipForCaptioning state dict (official .pth layout or torch.save)
    filter: str = ""  # filter checkpoint: a BlipForRetrieval state dict
    captioner_model: str = ""  # the captioner's model YAML when it differs from `model` ("" = model)
    filter_model: str = ""  # the filter's model YAML when it differs from `model` ("" = model)
    init_from_pretrain: bool = False  # checkpoints hold other weights too (pre-training): extra keys ignored
    out_dir: str = "runs/capfilt"  # where parts, markers and outputs go
    num_synthetic: int = 1  # synthetic captions per image
    threshold: float = 0.5  # keep a caption when the filter's p(match) >= threshold
    filter_original: bool = True  # filter the original captions too (the original does)
    prompt: str = "a picture of "  # the captioner's prompt (stripped from synthetic captions)
    top_p: float = 0.9  # nucleus sampling
    top_k: int = 50  # HF's default top-k, inherited by the original's sampling
    repetition_penalty: float = 1.1  # the original's sampling value
    max_length: int = 30  # tokens, prompt included (the original's default)
    min_length: int = 10  # tokens, prompt included
    max_text_len: int = 35  # filter tokenization (padding to this length, as retrieval)
    batch_size: int = 32  # images per captioner / filter batch
    chunk_size: int = 256  # images per work unit (the resume granularity)
    output_format: str = "auto"  # auto (as the input) | json | webdataset
    shard_size: int = 1000  # samples per output webdataset shard
    seed: int = 0  # sampling seed (per unit: seed, unit)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    merge_timeout: float = 86400.0  # seconds rank 0 waits for the other ranks' units

    def validate(self, where: str = "capfilt") -> None:
        def bad(msg):
            raise ConfigError(f"{where}: {msg}")

        for name in ("captioner", "filter"):
            if not getattr(self, name):
                bad(f"{name} checkpoint is not set ({name}=path/to/checkpoint)")
        if self.num_synthetic < 0:
            bad(f"num_synthetic must be >= 0, got {self.num_synthetic}")
        if not 0.0 <= self.threshold <= 1.0:
            bad(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_length > self.max_length:
            bad(f"min_length {self.min_length} exceeds max_length {self.max_length}")
        if self.batch_size < 1 or self.chunk_size < 1 or self.shard_size < 1:
            bad("batch_size, chunk_size and shard_size must be positive")
        if self.output_format not in ("auto", "json", "webdataset"):
            bad(f"output_format must be auto, json or webdataset, got {self.output_format!r}")


@dataclass
class CapfiltRun:
    model: BlipConfig  # the captioner's architecture
    filter_model: BlipConfig  # the filter's architecture
    data: Any  # blipfast.data.DataConfig
    capfilt: CapfiltConfig = field(default_factory=CapfiltConfig)
    source: str = ""


def load_capfilt_config(path: str, overrides: Optional[Mapping[str, Any]] = None) -> CapfiltRun:
    """A CapFilt YAML: `model` (model YAML path or mapping), `data` (DataConfig), `capfilt`."""
    from blipfast.data import DataConfig

    raw = load_yaml(path)
    base = os.path.dirname(os.path.abspath(path))
    whole, by_top = split_sections(raw, overrides or {}, ("model", "data", "capfilt"), path, required=("model",))
    if whole:
        raise ConfigError(f"override(s) {', '.join(map(repr, whole))}: expected model.X, data.X or capfilt.X")
    cf = load_section(CapfiltConfig, raw.get("capfilt"), by_top["capfilt"], f"{path}: capfilt")
    for name in ("captioner", "filter"):
        setattr(cf, name, resolve_path(getattr(cf, name), base))
    model_raw = raw["model"]
    cap_model = load_model_section(cf.captioner_model or model_raw, base, f"{path}: model", by_top["model"])
    filt_model = load_model_section(cf.filter_model or model_raw, base, f"{path}: model", by_top["model"])
    data = load_section(DataConfig, raw.get("data"), by_top["data"], f"{path}: data")
    return CapfiltRun(model=cap_model, filter_model=filt_model, data=data, capfilt=cf, source=str(path))


# ---------------------------------------------------------------------------------------------
# models


def build_models(run: CapfiltRun, tokenizer, device):
    from blipfast.models.caption import BlipForCaptioning
    from blipfast.models.retrieval import BlipForRetrieval

    cf = run.capfilt
    captioner = BlipForCaptioning(run.model, tokenizer=tokenizer, prompt=cf.prompt)
    load_model(captioner, cf.captioner, cf.init_from_pretrain)
    filt = BlipForRetrieval(run.filter_model)
    load_model(filt, cf.filter, cf.init_from_pretrain)
    return captioner.to(device).eval(), filt.to(device).eval()


# ---------------------------------------------------------------------------------------------
# one work unit


@torch.no_grad()
def itm_match_prob(filt, image_embeds: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """p(match) of caption c against image rows[c]; each image's cross-attention keys/values are
    projected once and indexed per caption."""
    kv = [(k[rows], v[rows]) for k, v in filt.text_encoder.image_kv(image_embeds)]
    return filt.itm_logits(ids, mask, image_kv=kv).float().softmax(dim=-1)[:, 1]


def captions_by_image(index) -> Dict[int, List[str]]:
    caps: Dict[int, List[str]] = {}
    for s, r in enumerate(index.sample_image.tolist()):
        caps.setdefault(r, []).append(index.captions[s])
    return caps


def process_unit(unit: int, rows: Sequence[int], index, captioner, filt, tokenizer, cf: CapfiltConfig,
                 device, pool=None, progress=None, caps_of: Optional[Dict[int, List[str]]] = None) -> List[dict]:
    """Candidates of the images `rows` of `index`: [{"row", "caption", "source", "p_match", "kept"}]."""
    from blipfast.data import tokenize
    from blipfast.data.torch_pipeline import eval_image

    caps_of = captions_by_image(index) if caps_of is None else caps_of
    sizes = {captioner.config.vision.image_size, filt.config.vision.image_size}
    gen = torch.Generator(device="cpu").manual_seed(cf.seed * 1_000_003 + unit)  # depends on (seed, unit) only
    out: List[dict] = []
    mapper = pool.map if pool is not None else map
    for b0 in range(0, len(rows), cf.batch_size):
        batch = list(rows[b0:b0 + cf.batch_size])
        datas = [index.read_image_bytes(r) for r in batch]
        images = {S: torch.from_numpy(np.stack(list(mapper(lambda d: eval_image(d, S), datas)))).to(device)
                  for S in sizes}
        cands = []  # (position in batch, caption, source)
        for i, r in enumerate(batch):
            cands += [(i, c, "original") for c in caps_of.get(r, [])]
        if cf.num_synthetic:
            img = images[captioner.config.vision.image_size]
            for _ in range(cf.num_synthetic):
                # Every draw's seed comes from (seed, unit): reruns and other rank counts agree.
                sub = torch.Generator(device=img.device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
                texts = captioner.generate(img, sample=True, max_length=cf.max_length, min_length=cf.min_length,
                                           top_p=cf.top_p, top_k=cf.top_k, repetition_penalty=cf.repetition_penalty,
                                           generator=sub)
                cands += [(i, t.strip(), "synthetic") for i, t in enumerate(texts)]
        embeds = filt.visual_encoder(images[filt.config.vision.image_size])  # (b, T, Cv)
        pos = torch.tensor([c[0] for c in cands], device=device)
        ids, mask = tokenize(tokenizer, [c[1] if c[1] else "." for c in cands], cf.max_text_len)
        p = itm_match_prob(filt, embeds, pos, ids.to(device), mask.to(device)).cpu().tolist()
        for (i, cap, src), pm in zip(cands, p):
            judged = cf.filter_original or src == "synthetic"
            keep = bool(cap) and (pm >= cf.threshold or not judged)
            out.append({"row": int(batch[i]), "caption": cap, "source": src, "p_match": float(pm), "kept": keep})
        if progress is not None:
            progress.update(len(batch))
    return out


# ---------------------------------------------------------------------------------------------
# orchestration


def _unit_paths(out_dir: str, unit: int):
    base = os.path.join(out_dir, "parts", f"unit_{unit:06d}")
    return base + ".json", base + ".done"


def _world(rank: Optional[int], world_size: Optional[int]):
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def _device(name: str):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def run_capfilt(run: CapfiltRun, rank: Optional[int] = None, world_size: Optional[int] = None,
                merge: bool = True, show_progress: bool = True, log=print) -> Optional[dict]:
    """Process this rank's units, then (rank 0, merge=True) merge everything. Returns the summary
    on the merging rank, else None."""
    from blipfast.data import tokenizer_from_config
    from blipfast.data.index import build_train_index

    cf = run.capfilt
    rank, world_size = _world(rank, world_size)
    device = _device(cf.device)
    os.makedirs(os.path.join(cf.out_dir, "parts"), exist_ok=True)
    index = build_train_index(run.data)
    units = [list(range(s, min(s + cf.chunk_size, index.num_images))) for s in range(0, index.num_images, cf.chunk_size)]
    mine = [u for u in range(len(units)) if u % world_size == rank and not os.path.exists(_unit_paths(cf.out_dir, u)[1])]
    skipped = sum(1 for u in range(len(units)) if u % world_size == rank) - len(mine)
    log(f"capfilt rank {rank}/{world_size}: {index.num_images} images in {len(units)} units; "
        f"{len(mine)} to do, {skipped} already done")
    if mine:
        tokenizer = tokenizer_from_config(run.data)
        captioner, filt = build_models(run, tokenizer, device)
        progress = None
        if show_progress:
            from tqdm import tqdm

            progress = tqdm(total=sum(len(units[u]) for u in mine), desc=f"capfilt rank {rank}", unit="img",
                            file=sys.stderr, dynamic_ncols=True)
        caps_of = captions_by_image(index)
        with ThreadPoolExecutor(max(1, run.data.num_threads)) as pool:
            for u in mine:
                recs = process_unit(u, units[u], index, captioner, filt, tokenizer, cf, device, pool, progress, caps_of)
                part, done = _unit_paths(cf.out_dir, u)
                atomic_write_json(part, recs)
                atomic_write_json(done, {"unit": u, "images": len(units[u]), "candidates": len(recs)})  # the commit
        if progress is not None:
            progress.close()
    if not merge or rank != 0:
        return None
    wait_for_units(cf.out_dir, len(units), cf.merge_timeout)
    return merge_outputs(run, index, len(units), log=log)


def wait_for_units(out_dir: str, n_units: int, timeout: float, poll: float = 5.0) -> None:
    """Wait (no collective: file markers) until every unit is done; raise after `timeout` seconds."""
    t0 = time.monotonic()
    while True:
        missing = [u for u in range(n_units) if not os.path.exists(_unit_paths(out_dir, u)[1])]
        if not missing:
            return
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{len(missing)} of {n_units} CapFilt units are not done after {timeout:.0f} s "
                               f"(e.g. unit {missing[0]}); rerun the missing ranks, then `--merge-only`")
        time.sleep(poll)


def _is_webdataset(run: CapfiltRun) -> bool:
    d = run.data
    return d.format == "webdataset" or (d.format == "synthetic" and d.synthetic.reader == "webdataset")


def merge_outputs(run: CapfiltRun, index, n_units: int, log=print) -> dict:
    cf = run.capfilt
    records: List[dict] = []
    for u in range(n_units):
        with open(_unit_paths(cf.out_dir, u)[0]) as f:
            records += json.load(f)
    summary: Dict[str, Any] = {src: {"kept": 0, "dropped": 0} for src in SOURCES}
    for r in records:
        summary[r["source"]]["kept" if r["kept"] else "dropped"] += 1
    for r in records:
        r["image"] = index.names[r["row"]]
    atomic_write_json(os.path.join(cf.out_dir, "candidates.json"), records)
    kept = [r for r in records if r["kept"]]
    fmt = cf.output_format if cf.output_format != "auto" else ("webdataset" if _is_webdataset(run) else "json")
    if fmt == "json":
        if _is_webdataset(run):
            raise ConfigError("output_format json needs image files: the input is webdataset (use webdataset)")
        ann = [{"image": os.path.abspath(r["image"]), "caption": r["caption"], "source": r["source"]} for r in kept]
        out = os.path.join(cf.out_dir, "capfilt.json")
        atomic_write_json(out, ann)
    else:
        out = write_shards(os.path.join(cf.out_dir, "shards"), kept, index, cf.shard_size)
    summary.update(images=index.num_images, candidates=len(records), kept=len(kept), threshold=cf.threshold,
                   output=out, format=fmt)
    atomic_write_json(os.path.join(cf.out_dir, "summary.json"), summary)
    log("capfilt summary: " + ", ".join(f"{s}: kept {summary[s]['kept']}, dropped {summary[s]['dropped']}"
                                        for s in SOURCES) + f" -> {out}")
    return summary


def write_shards(out_dir: str, kept: List[dict], index, shard_size: int) -> str:
    """One webdataset sample per kept pair ({key}.jpg, {key}.txt, {key}.json), as img2dataset does."""
    os.makedirs(out_dir, exist_ok=True)
    for s in range(0, max(1, len(kept)), shard_size):
        path = os.path.join(out_dir, f"capfilt-{s // shard_size:05d}.tar")
        with atomic_open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i, r in enumerate(kept[s:s + shard_size], start=s):
                key = f"{i:08d}"
                meta = json.dumps({"caption": r["caption"], "source": r["source"], "p_match": r["p_match"],
                                   "image": r["image"]}).encode()
                for name, data in ((f"{key}.jpg", index.read_image_bytes(r["row"])),
                                   (f"{key}.txt", r["caption"].encode()), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(out_dir, "capfilt-*.tar")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m blipfast.capfilt", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="CapFilt YAML (model, data, capfilt sections)")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of ranks (default: $WORLD_SIZE or 1)")
    p.add_argument("--merge-only", action="store_true", help="only merge finished units (all must be done)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. capfilt.threshold=0.6 capfilt.captioner=ckpt.pth data.ann_files=[a.json]")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run = load_capfilt_config(args.config, parse_overrides(args.overrides))
        if args.merge_only:
            from blipfast.data.index import build_train_index

            index = build_train_index(run.data)
            n_units = -(-index.num_images // run.capfilt.chunk_size)
            wait_for_units(run.capfilt.out_dir, n_units, timeout=0.0)
            merge_outputs(run, index, n_units)
            return 0
        run_capfilt(run, args.rank, args.world_size, show_progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, TimeoutError, ValueError) as e:  # ValueError: weights that do not fit
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
