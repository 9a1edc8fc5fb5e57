"""Use a BLIP checkpoint from the command line: score image-text pairs, caption, classify.

    python -m blipfast.predict --checkpoint CKPT --images DIR_OR_FILES... --texts "a red square" "a blue circle"
    python -m blipfast.predict --checkpoint CKPT --images DIR --task caption
    python -m blipfast.predict --checkpoint CKPT --images DIR --classes circle square triangle [--top-k-itm 2]

CKPT is anything `blipfast.load` reads (official .pth, blipfast export, HF directory, training
output directory). Images are read in batches of --batch-size and results are printed as each
batch finishes (progress on stderr); --out also writes them as JSON. Scores: ITM p(match) and the
ITC cosine of every (image, text) pair; each image's ViT tokens and cross-attention keys/values
are computed once for all the texts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def list_images(items: Sequence[str]) -> List[str]:
    """Image files from directories (sorted, by extension) and file paths, in the order given."""
    out: List[str] = []
    for item in items:
        if os.path.isdir(item):
            out += [os.path.join(item, f) for f in sorted(os.listdir(item)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise FileNotFoundError(f"--images: {item} is neither a file nor a directory")
    if not out:
        raise FileNotFoundError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {list(items)}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m blipfast.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="official .pth, blipfast export, HF directory or run directory")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or directories")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--texts", nargs="+", help="score every image against these texts (ITM and ITC)")
    mode.add_argument("--classes", nargs="+", help="zero-shot classify every image into these classes")
    mode.add_argument("--task", choices=("caption",), help="caption: write a caption for every image")
    p.add_argument("--templates", nargs="+", default=None, help="prompt templates with {} for --classes")
    p.add_argument("--top-k-itm", type=int, default=0, help="with --classes: re-rank the top k classes by ITM")
    p.add_argument("--num-beams", type=int, default=3, help="with --task caption")
    p.add_argument("--max-length", type=int, default=20, help="with --task caption: tokens, prompt included")
    p.add_argument("--min-length", type=int, default=5, help="with --task caption")
    p.add_argument("--tokenizer", default=None, help="vocab.txt, a directory with one, or 'demo' (default: beside "
                                                     "the checkpoint)")
    p.add_argument("--config", default=None, help="model YAML for a .pth whose heads are not BLIP's")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error("--batch-size must be positive")
    if a.top_k_itm and not a.classes:
        p.error("--top-k-itm goes with --classes")
    return a


def _score_rows(model, batch: List[str], texts: List[str]) -> List[Dict]:
    itm = model.itm_score(batch, texts)  # (b, T) p(match)
    itc = model.itc_score(batch, texts)  # (b, T) cosine
    return [{"image": path, "itm": [round(float(v), 6) for v in itm[i]], "itc": [round(float(v), 6) for v in itc[i]]}
            for i, path in enumerate(batch)]


def _class_rows(clf, batch: List[str], k: int) -> List[Dict]:
    res = clf.classify(batch, top_k_itm=k)
    order = res.scores.argsort(dim=1, descending=True)
    rows = []
    for i, path in enumerate(batch):
        top = [{"class": clf.class_names[c], "score": round(float(res.scores[i, c]), 6),
                "itc": round(float(res.itc[i, c]), 6)} for c in order[i, :k or 3].tolist()]  # re-ranked ones
        rows.append({"image": path, "label": res.labels[i], "top": top})
    return rows


def _print_rows(mode: str, rows: List[Dict], width: int) -> None:
    for r in rows:
        name = os.path.basename(r["image"]).ljust(width)
        if mode == "scores":
            cells = "  ".join(f"{m:.3f} ({c:+.3f})" for m, c in zip(r["itm"], r["itc"]))
            print(f"{name}  {cells}")
        elif mode == "classify":
            alts = ", ".join(f"{t['class']} {t['score']:.3f}" for t in r["top"][1:])
            print(f"{name}  {r['label']}  ({r['top'][0]['score']:.3f}" + (f"; then {alts})" if alts else ")"))
        else:
            print(f"{name}  {r['caption']}")
    sys.stdout.flush()


def _write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # never a half-written results file


def main(argv=None) -> int:
    from tqdm import tqdm

    import blipfast

    a = parse_args(argv)
    try:
        paths = list_images(a.images)
        model = blipfast.load(a.checkpoint, tokenizer=a.tokenizer, config=a.config, device=a.device)
        mode = "scores" if a.texts else "classify" if a.classes else "caption"
        clf = model.zero_shot_classifier(a.classes, a.templates) if a.classes else None
        if a.classes and not 0 <= a.top_k_itm <= len(a.classes):
            raise ValueError(f"--top-k-itm must be in [0, {len(a.classes)}]")
    except (FileNotFoundError, ValueError, TypeError) as e:  # LayoutError, CheckpointError, ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = min(40, max(len(os.path.basename(p)) for p in paths))
    if mode == "scores":
        for j, t in enumerate(a.texts):
            print(f"T{j + 1} = {t}")
        print("cells: ITM p(match) (ITC cosine)")
        print("image".ljust(width) + "  " + "  ".join(f"T{j + 1}".ljust(14) for j in range(len(a.texts))))
    results: List[Dict] = []
    with tqdm(total=len(paths), file=sys.stderr, disable=a.no_progress, unit="img", desc=mode) as bar:
        for s in range(0, len(paths), a.batch_size):
            batch = paths[s:s + a.batch_size]
            try:
                if mode == "scores":
                    rows = _score_rows(model, batch, a.texts)
                elif mode == "classify":
                    rows = _class_rows(clf, batch, a.top_k_itm)
                else:
                    caps = model.caption(batch, num_beams=a.num_beams, max_length=a.max_length,
                                         min_length=a.min_length)
                    rows = [{"image": p, "caption": c} for p, c in zip(batch, caps)]
            except (FileNotFoundError, ValueError) as e:  # an unreadable image names itself
                print(f"error: {e}", file=sys.stderr)
                return 2
            bar.clear()
            _print_rows(mode, rows, width)
            results += rows
            bar.update(len(batch))
    if a.out:
        out = {"checkpoint": a.checkpoint, "task": model.task, "layout": model.layout, "mode": mode,
               "results": results}
        if a.texts:
            out["texts"] = a.texts
        if a.classes:
            out.update(classes=a.classes, templates=clf.templates, top_k_itm=a.top_k_itm)
        _write_json(out, a.out)
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
