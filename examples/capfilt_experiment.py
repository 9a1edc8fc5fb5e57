"""CapFilt on the embedded synthetic dataset: does bootstrapping find and fix corrupted captions?

    python examples/capfilt_experiment.py --out runs/capfilt_experiment [--num-train 2000 ...]

1. Generate the synthetic dataset (coloured shapes; every caption is determined by its image).
2. Split its train part into a small "human-annotated" clean part (COCO's role in BLIP) and a
   "web" part, and corrupt a known fraction of the web captions by swapping them among
   themselves (no caption stays with its own image).
3. Pre-train a tiny BLIP on clean + noisy web data.
4. Fine-tune a captioner (LM loss, prompt "a picture of ") and a filter (retrieval ITC + ITM)
   from the pre-trained weights on the clean part, as BLIP fine-tunes both on COCO.
5. Run CapFilt (`blipfast.capfilt.run_capfilt`, the code behind the CLI) on the web part.
6. Report the filter's precision and recall at dropping the corrupted captions, and re-train the
   same model from scratch on (a) clean + noisy web and (b) clean + bootstrapped web; report
   held-out retrieval recall of both.

The training loops here are plain single-process PyTorch loops (AdamW, linear warm-up, no
augmentation), small enough for a CPU; the DeepSpeed trainer (`train.py`) is what to use for
real runs. Results go to OUT/results.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# blip_tiny with 2 instead of 3 layers per tower and no dropout: learns faster on 2 CPU cores.
# (At these sizes ITM stays at its prior, loss 0.636, for the first ~400 steps, then drops.)
DEMO_OVERRIDES = {"vision.depth": 2, "text.num_hidden_layers": 2, "text.hidden_dropout_prob": 0.0,
                  "text.attention_probs_dropout_prob": 0.0}


@dataclass
class Scale:
    num_train: int = 600  # synthetic train images (clean + web)
    num_val: int = 100  # held-out images for retrieval recall
    image_size: int = 64  # generated image side; the model's vision.image_size is set to it
    model: str = os.path.join(REPO, "configs", "blip_tiny.yaml")  # model YAML
    model_overrides: Optional[Dict] = field(default_factory=lambda: dict(DEMO_OVERRIDES))  # dotted model overrides
    clean_fraction: float = 0.25  # share of train images in the clean, "human-annotated" part
    corrupt_fraction: float = 0.3  # share of web captions swapped to another image
    batch_size: int = 32
    pretrain_steps: int = 1000
    finetune_steps: int = 300  # captioner and filter, each
    retrain_steps: int = 1000  # each of the two re-trained models
    lr: float = 5e-4
    finetune_lr: float = 2e-4
    num_synthetic: int = 1  # synthetic captions per web image
    threshold: float = 0.5  # filter threshold on p(match)
    k_test: int = 32  # ITM re-ranking depth of the retrieval evaluation
    seed: int = 0
    log_every: int = 50


# -- data ---------------------------------------------------------------------------------------


def corrupt_captions(records: List[dict], fraction: float, rng: np.random.Generator):
    """Swap the captions of a random `fraction` of records among themselves (a cyclic shift of a
    random order, so none keeps its own). Returns (new records, indices whose caption changed)."""
    n = int(round(fraction * len(records)))
    chosen = rng.permutation(len(records))[:n]
    out = [dict(r) for r in records]
    if n >= 2:
        for a, b in zip(chosen, np.roll(chosen, 1)):
            out[a]["caption"] = records[b]["caption"]
    corrupted = {int(i) for i in chosen if out[i]["caption"] != records[i]["caption"]}
    return out, corrupted


def same_description(a: str, b: str) -> bool:
    """Do two synthetic captions name the same objects? (canonical and "there is ..." variants)."""
    def parts(c):
        c = c.strip()
        c = c[len("there is "):] if c.startswith("there is ") else c
        return frozenset(p.strip() for p in c.split(" and "))
    return parts(a) == parts(b)


class ImageTextSet:
    """Images decoded once (eval transform: resize to S x S, normalise) with their captions."""

    def __init__(self, records: Sequence[dict], image_root: str, size: int):
        from blipfast.data.torch_pipeline import eval_image

        paths = [os.path.join(image_root, r["image"]) for r in records]
        uniq = list(dict.fromkeys(paths))
        row = {p: i for i, p in enumerate(uniq)}
        arrays = []
        for p in uniq:
            with open(p, "rb") as f:
                arrays.append(eval_image(f.read(), size))
        self.images = torch.from_numpy(np.stack(arrays))  # (N_img, 3, S, S)
        self.image_of = torch.tensor([row[p] for p in paths])  # (N,) image row of each caption
        self.captions = [r["caption"] for r in records]

    def __len__(self):
        return len(self.captions)

    def batch(self, g: torch.Generator, B: int):
        pick = torch.randperm(len(self), generator=g)[:B]
        return self.images[self.image_of[pick]], [self.captions[i] for i in pick.tolist()], self.image_of[pick]


def fit(model: torch.nn.Module, loss_fn: Callable, data: ImageTextSet, steps: int, lr: float, batch_size: int,
        seed: int, what: str, log_every: int = 100, log=print) -> List[float]:
    """A plain training loop: AdamW (weight decay 0.05, as BLIP), linear warm-up over 10% of the
    steps, random batches. loss_fn(model, images, captions, image_ids, step, steps) -> scalar."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warm = max(1, steps // 10)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm)
        images, caps, ids = data.batch(g, batch_size)
        loss = loss_fn(model, images, caps, ids, step, steps)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{what}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            log(f"  {what} step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


# -- the stages ---------------------------------------------------------------------------------


def _alpha(step, steps):  # the original ramps alpha to 0.4 over the first 2 of 20 epochs
    return 0.4 * min(1.0, step / max(1, steps // 10))


def pretrain(cfg, tok, data, steps, scale: Scale, seed, what, log):
    from blipfast.data import tokenize
    from blipfast.models import BlipForPretraining

    torch.manual_seed(seed)
    model = BlipForPretraining(cfg)

    def loss_fn(m, images, caps, ids, step, n):
        input_ids, mask = tokenize(tok, caps, cfg.max_text_len)
        return m(images, input_ids, mask, _alpha(step, n)).loss

    fit(model, loss_fn, data, steps, scale.lr, scale.batch_size, seed, what, scale.log_every, log)
    return model


def finetune_captioner(cfg, tok, pre_sd, data, scale: Scale, log):
    from blipfast.capfilt import load_state
    from blipfast.models.caption import BlipForCaptioning

    model = BlipForCaptioning(cfg, tokenizer=tok)
    load_state(model, pre_sd, init_from_pretrain=True)

    def loss_fn(m, images, caps, ids, step, n):
        input_ids, mask = m.tokenize(caps)
        return m(images, input_ids, mask)

    fit(model, loss_fn, data, scale.finetune_steps, scale.finetune_lr, scale.batch_size, scale.seed + 1,
        "captioner", scale.log_every, log)
    return model


def finetune_filter(cfg, tok, pre_sd, data, scale: Scale, log):
    from blipfast.capfilt import load_state
    from blipfast.data import tokenize
    from blipfast.models.retrieval import BlipForRetrieval

    model = BlipForRetrieval(cfg)
    load_state(model, pre_sd, init_from_pretrain=True)
    model.copy_params()  # momentum encoders start from the loaded online weights

    def loss_fn(m, images, caps, ids, step, n):
        input_ids, mask = tokenize(tok, caps, 35)
        return m(images, input_ids, mask, _alpha(step, n), ids).loss

    fit(model, loss_fn, data, scale.finetune_steps, scale.finetune_lr, scale.batch_size, scale.seed + 2,
        "filter", scale.log_every, log)
    return model


def retrieval_recall(model, eval_set, k_test: int) -> Dict[str, float]:
    from blipfast.eval.retrieval import evaluate, extract_features

    feats = extract_features(model, eval_set.images, (eval_set.input_ids, eval_set.attention_mask))
    return evaluate(model, feats, eval_set.txt2img.tolist(), eval_set.img2txt, k_test=k_test)


def model_config(scale: Scale, world_batch: int):
    from blipfast.config import BlipConfig

    over = dict(scale.model_overrides or {})
    over["vision.image_size"] = scale.image_size
    cfg = BlipConfig.from_yaml(scale.model, over)
    cfg.max_text_len = max(cfg.max_text_len, 24)  # "there is" captions of two objects are 20 tokens
    if cfg.queue_size % world_batch:
        cfg.queue_size = world_batch * max(1, cfg.queue_size // world_batch)  # the queue takes whole batches
    return cfg


def run(out_dir: str, scale: Scale, log=print) -> dict:
    from blipfast.capfilt import CapfiltConfig, CapfiltRun, run_capfilt
    from blipfast.data import DataConfig, SyntheticConfig, build_demo_tokenizer, build_eval_set, generate_synthetic

    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(scale.seed)
    cfg = model_config(scale, scale.batch_size)
    tok = build_demo_tokenizer()
    syn = SyntheticConfig(out_dir=os.path.join(out_dir, "data"), num_train=scale.num_train, num_val=scale.num_val,
                          seed=scale.seed, image_size=scale.image_size)
    paths = generate_synthetic(syn.out_dir, syn.num_train, syn.num_val, syn.seed, syn.image_size)
    with open(paths.train_json) as f:
        records = json.load(f)
    rng = np.random.default_rng(scale.seed)
    order = rng.permutation(len(records))
    n_clean = max(scale.batch_size, int(round(scale.clean_fraction * len(records))))
    clean = [records[i] for i in order[:n_clean]]
    web = [records[i] for i in order[n_clean:]]
    noisy_web, corrupted = corrupt_captions(web, scale.corrupt_fraction, rng)
    ann = {name: os.path.join(out_dir, f"{name}.json") for name in ("clean", "web_noisy")}
    for name, recs in (("clean", clean), ("web_noisy", noisy_web)):
        with open(ann[name], "w") as f:
            json.dump(recs, f)
    log(f"data: {len(clean)} clean, {len(web)} web images, {len(corrupted)} web captions corrupted")

    root = paths.image_root
    noisy_all = ImageTextSet(clean + noisy_web, root, scale.image_size)
    clean_set = ImageTextSet(clean, root, scale.image_size)
    data_cfg = dict(backend="torch", tokenizer="demo", num_threads=2, cache_dir=os.path.join(out_dir, "cache"))
    eval_set = build_eval_set(DataConfig(format="synthetic", synthetic=syn, **data_cfg), tok, scale.image_size, 35)

    log("pre-training on clean + noisy web")
    pre = pretrain(cfg, tok, noisy_all, scale.pretrain_steps, scale, scale.seed, "pretrain", log)
    pre_sd = pre.state_dict()
    captioner = finetune_captioner(cfg, tok, pre_sd, clean_set, scale, log)
    filt = finetune_filter(cfg, tok, pre_sd, clean_set, scale, log)
    ckpt = {name: os.path.join(out_dir, f"{name}.pt") for name in ("captioner", "filter")}
    torch.save(captioner.state_dict(), ckpt["captioner"])
    torch.save(filt.state_dict(), ckpt["filter"])

    log("CapFilt on the web part")
    cf_dir = os.path.join(out_dir, "capfilt")
    cf = CapfiltConfig(captioner=ckpt["captioner"], filter=ckpt["filter"], out_dir=cf_dir,
                       num_synthetic=scale.num_synthetic, threshold=scale.threshold, batch_size=64,
                       seed=scale.seed, device="cpu", max_length=30, min_length=10)
    data = DataConfig(format="json", ann_files=[ann["web_noisy"]], image_root=root, **data_cfg)
    summary = run_capfilt(CapfiltRun(model=cfg, filter_model=cfg, data=data, capfilt=cf), rank=0, world_size=1,
                          show_progress=False, log=log)

    # Filter quality on the original web captions: "positive" = corrupted.
    with open(os.path.join(cf_dir, "candidates.json")) as f:
        cands = json.load(f)
    web_row = {os.path.abspath(os.path.join(root, r["image"])): i for i, r in enumerate(noisy_web)}
    orig = [c for c in cands if c["source"] == "original"]
    dropped = {web_row[os.path.abspath(c["image"])] for c in orig if not c["kept"]}
    tp = len(dropped & corrupted)
    precision = tp / len(dropped) if dropped else float("nan")
    recall = tp / len(corrupted) if corrupted else float("nan")
    p_match = {web_row[os.path.abspath(c["image"])]: c["p_match"] for c in orig}
    sweep = {}  # other thresholds, from the stored scores (no recomputation)
    for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
        d = {i for i, p in p_match.items() if p < t}
        sweep[str(t)] = {"precision": len(d & corrupted) / len(d) if d else float("nan"),
                         "recall": len(d & corrupted) / len(corrupted) if corrupted else float("nan")}
    bad_p = [p for i, p in p_match.items() if i in corrupted]
    good_p = [p for i, p in p_match.items() if i not in corrupted]
    # AUC: chance that a clean caption scores above a corrupted one (0.5 = no better than chance)
    auc = float(np.mean([(g > b) + 0.5 * (g == b) for g in good_p for b in bad_p])) if bad_p and good_p else float("nan")
    synth = [c for c in cands if c["source"] == "synthetic"]
    truth = {i: r["caption"] for i, r in enumerate(web)}
    synth_correct = [same_description(c["caption"], truth[web_row[os.path.abspath(c["image"])]]) for c in synth]
    kept_correct = [ok for c, ok in zip(synth, synth_correct) if c["kept"]]

    log("re-training from scratch: noisy vs bootstrapped")
    with open(os.path.join(cf_dir, "capfilt.json")) as f:
        boot = json.load(f)  # absolute image paths
    boot_set = ImageTextSet([{"image": os.path.join(root, r["image"]), "caption": r["caption"]} for r in clean]
                            + boot, "/", scale.image_size)
    results = {"scale": dataclasses.asdict(scale), "web_images": len(web), "corrupted": len(corrupted),
               "capfilt_summary": summary,
               "filter": {"precision": precision, "recall": recall, "dropped_original": len(dropped),
                          "true_positives": tp, "auc": auc, "threshold_sweep": sweep},
               "synthetic": {"correct_rate": float(np.mean(synth_correct)) if synth else float("nan"),
                             "kept_correct_rate": float(np.mean(kept_correct)) if kept_correct else float("nan"),
                             "kept": len(kept_correct), "total": len(synth)},
               "recall": {"pretrained": retrieval_recall(pre, eval_set, scale.k_test)}}
    for name, ds in (("noisy", noisy_all), ("bootstrapped", boot_set)):
        m = pretrain(cfg, tok, ds, scale.retrain_steps, scale, scale.seed + 10, f"retrain-{name}", log)
        results["recall"][name] = retrieval_recall(m, eval_set, scale.k_test)
    results["train_samples"] = {"noisy": len(noisy_all), "bootstrapped": len(boot_set)}
    results["wall_s"] = time.perf_counter() - t_start
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def report(res: dict) -> str:
    f, s = res["filter"], res["synthetic"]
    lines = [
        f"web captions: {res['web_images']}, corrupted: {res['corrupted']}",
        f"filter on original web captions: dropped {f['dropped_original']}, precision {f['precision']:.3f}, "
        f"recall {f['recall']:.3f}, AUC {f['auc']:.3f} (finding corrupted captions)",
        "  other thresholds (P / R): " + ", ".join(f"{t}: {v['precision']:.2f} / {v['recall']:.2f}"
                                                   for t, v in f.get("threshold_sweep", {}).items()),
        f"synthetic captions: {s['total']}, correct {s['correct_rate']:.3f}; kept {s['kept']}, "
        f"of which correct {s['kept_correct_rate']:.3f}",
        "held-out retrieval (percent)   txt_r1  txt_r5  img_r1  img_r5  r_mean",
    ]
    for name, r in res["recall"].items():
        lines.append(f"  {name:27s} {r['txt_r1']:7.1f} {r['txt_r5']:7.1f} {r['img_r1']:7.1f} {r['img_r5']:7.1f} "
                     f"{r['r_mean']:7.1f}")
    lines.append(f"wall time {res['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/capfilt_experiment")
    for fld in dataclasses.fields(Scale):
        if fld.name == "model_overrides":
            continue
        p.add_argument("--" + fld.name.replace("_", "-"), type=type(fld.default), default=fld.default)
    p.add_argument("--model-override", action="append", default=[], metavar="key=value",
                   help="override the model YAML, e.g. --model-override text.num_hidden_layers=2 (repeatable)")
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    from blipfast.config import parse_override

    args["model_overrides"] = {**DEMO_OVERRIDES, **dict(parse_override(o) for o in args.pop("model_override"))}
    res = run(out, Scale(**args))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
