"""Task vqa's data: the synthetic questions (checked against an independent oracle), the
original's answer weights, the loader's batch layout, the held-out set, and the errors."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from blipfast.data import DataConfig, build_demo_tokenizer, generate_synthetic
from blipfast.data.config import DataError
from blipfast.data.synthetic import POSITION_PHRASES, SceneObject, _sample_scene
from blipfast.data.synthetic_vqa import KINDS, answer_list, make_questions
from blipfast.data.vqa import (VG_WEIGHT, answer_weights, build_vqa_eval_set, build_vqa_loader,
                               build_vqa_train_index, load_answer_list)

PHRASE_TO_POS = {v: k for k, v in POSITION_PHRASES.items()}


def oracle(objs, question: str) -> str:
    """The answer, computed from the scene by reading the question (independent of the generator)."""
    m = re.fullmatch(r"what color is the (\w+)\?", question)
    if m:
        (o,) = [o for o in objs if o.shape == m[1]]
        return o.colour
    m = re.fullmatch(r"what shape is (.+)\?", question)
    if m:
        (o,) = [o for o in objs if o.position == PHRASE_TO_POS[m[1]]]
        return o.shape
    m = re.fullmatch(r"what size is the (\w+) (\w+)\?", question)
    if m:
        (o,) = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])]
        return o.size
    m = re.fullmatch(r"where is the (\w+) (\w+)\?", question)
    if m:
        (o,) = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])]
        return o.position
    m = re.fullmatch(r"is there a (\w+) (\w+)\?", question)
    if m:
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no"
    assert question == "how many shapes are there?", question
    return str(len(objs))


def test_synthetic_questions_are_answered_right_and_tokenize():
    rng = np.random.default_rng(0)
    scenes = [_sample_scene(rng) for _ in range(400)]
    # Scenes with a repeated shape / colour-shape pair exercise the "asked only when unambiguous" rules.
    scenes.append([SceneObject("small", "red", "circle", "left"), SceneObject("large", "red", "circle", "right")])
    recs = make_questions(scenes, [f"{i}.jpg" for i in range(len(scenes))], np.random.default_rng(1), 3, 100)
    by_image = {}
    for r in recs:
        by_image.setdefault(r["image"], []).append(r)
        assert r["dataset"] == "vqa" and len(r["answer"]) == 10 and len(set(r["answer"])) == 1
        objs = scenes[int(r["image"].split(".")[0])]
        assert r["answer"][0] == oracle(objs, r["question"]), r
    assert [r["question_id"] for r in recs] == list(range(100, 100 + len(recs)))
    assert all(len(v) == 3 for v in by_image.values())  # every scene has at least 3 applicable kinds
    twins = {r["question"] for r in by_image[f"{len(scenes) - 1}.jpg"]}
    assert not any(q.startswith(("what color is the circle", "what size", "where")) for q in twins)
    answers = {r["answer"][0] for r in recs}
    assert answers <= set(answer_list()) and {"yes", "no", "1", "2"} <= answers
    tok = build_demo_tokenizer()
    for q in {r["question"] for r in recs} | set(answer_list()):
        assert tok.unk_token_id not in tok(q).input_ids, q


def test_generated_dataset_has_questions_for_every_image(tmp_path):
    paths = generate_synthetic(str(tmp_path / "syn"), num_train=12, num_val=6)
    train, val = json.load(open(paths.vqa_train_json)), json.load(open(paths.vqa_val_json))
    assert {r["image"] for r in train} == {f"train/{i:06d}.jpg" for i in range(12)}
    assert {r["image"] for r in val} == {f"val/{i:06d}.jpg" for i in range(6)}
    assert len({r["question_id"] for r in train + val}) == len(train) + len(val)
    assert json.load(open(paths.answer_list)) == answer_list()
    again = generate_synthetic(str(tmp_path / "syn2"), num_train=12, num_val=6)
    assert json.load(open(again.vqa_train_json)) == train  # deterministic


def test_answer_weights_as_the_original():
    answers, weights = answer_weights({"answer": ["yes", "no", "yes", "yes"], "dataset": "vqa"})
    assert answers == ["yes", "no"] and weights == pytest.approx([0.75, 0.25])
    assert answer_weights({"answer": "tree", "dataset": "vg"}) == (["tree"], [VG_WEIGHT])
    assert answer_weights({"answer": ["two"]}) == (["two"], [1.0])  # dataset defaults to vqa


@pytest.fixture()
def vqa_files(tmp_path):
    """4 images (one missing on disk) and 6 questions, one of them Visual Genome style."""
    root = tmp_path / "img"
    (root / "coco").mkdir(parents=True)
    vg = tmp_path / "vg"
    vg.mkdir()
    for i, c in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (40 + i, 30), c).save(root / "coco" / f"{i}.jpg")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(vg / "v.jpg")
    train = [
        {"question_id": 1, "question": "What colour is THIS?", "answer": ["red", "red", "dark red"], "image": "coco/0.jpg", "dataset": "vqa"},
        {"question_id": 2, "question": "is it green?", "answer": ["yes"] * 10, "image": "coco/1.jpg", "dataset": "vqa"},
        {"question_id": 3, "question": "what is it?", "answer": "square", "image": "v.jpg", "dataset": "vg"},
        {"question_id": 4, "question": "how many?", "answer": ["one", "two"], "image": "coco/2.jpg"},
        {"question_id": 5, "question": "where?", "answer": ["x"], "image": "coco/missing.jpg", "dataset": "vqa"},
        {"question_id": 6, "question": "which one is it?", "answer": ["blue"], "image": "coco/2.jpg", "dataset": "vqa"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(train))
    test = [{"question_id": 10 + i, "question": f"what is {i}?", "image": f"coco/{i}.jpg",
             "answer": ["red"] * 10} for i in range(3)]
    (tmp_path / "test.json").write_text(json.dumps(test))
    (tmp_path / "answers.json").write_text(json.dumps(["red", "yes", "blue", "dark red"]))
    cfg = DataConfig(format="json", ann_files=["unused.json"], backend="torch", hflip=False, rand_augment=False,
                     cache_dir="none", min_scale=0.9)
    cfg.vqa.train_files = [str(tmp_path / "train.json")]
    cfg.vqa.image_root, cfg.vqa.vg_image_root = str(root), str(vg)
    cfg.vqa.eval_file, cfg.vqa.answer_list = str(tmp_path / "test.json"), str(tmp_path / "answers.json")
    return cfg, train


def test_index_skips_missing_images_and_shares_image_rows(vqa_files):
    cfg, train = vqa_files
    ix = build_vqa_train_index(cfg)
    assert ix.question_ids == [1, 2, 3, 4, 6]
    assert ix.stats["missing"] == 1 and ix.stats["skipped_samples"] == 1
    assert ix.num_images == 4 and ix.sample_image[3] == ix.sample_image[4]  # questions 4 and 6: one image
    assert ix.captions[0] == "what colour is this?"  # pre_question: lowercased, '?' kept
    assert ix.answers[0] == ["red", "dark red"] and ix.weights[0] == pytest.approx([2 / 3, 1 / 3])
    assert ix.answers[2] == ["square"] and ix.weights[2] == [VG_WEIGHT]
    assert ix.names[ix.sample_image[2]].endswith("vg/v.jpg")


def test_loader_batch_layout(vqa_files):
    cfg, _ = vqa_files
    tok = build_demo_tokenizer()
    loader = build_vqa_loader(cfg, tok, image_size=16, batch_size=5)
    (batch,) = list(loader.epoch(0))
    ix = loader.index
    order = batch["index"].tolist()
    assert sorted(order) == list(range(5))
    assert batch["images"].shape == (5, 3, 16, 16)
    want_answers = [a for i in order for a in ix.answers[i]]
    assert batch["n_answers"].tolist() == [len(ix.answers[i]) for i in order]
    assert batch["weights"].tolist() == pytest.approx([w for i in order for w in ix.weights[i]])
    assert batch["answer_ids"].shape[0] == sum(batch["n_answers"].tolist()) == len(want_answers)
    got = [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(batch["answer_ids"], batch["answer_mask"])]
    assert got == [tok.decode(tok(a).input_ids, skip_special_tokens=True) for a in want_answers]
    q = tok([ix.captions[i] for i in order], padding="longest", return_tensors="pt")
    assert torch.equal(batch["input_ids"], q.input_ids) and torch.equal(batch["attention_mask"], q.attention_mask)
    assert batch["answer_ids"][:, 0].eq(tok.cls_token_id).all()  # the model writes [DEC] over [CLS]


def test_loader_ranks_are_disjoint(vqa_files):
    cfg, _ = vqa_files
    tok = build_demo_tokenizer()
    seen = [b["index"].tolist() for r in range(2) for b in build_vqa_loader(cfg, tok, 16, 2, rank=r, world_size=2).epoch(1)]
    flat = [i for s in seen for i in s]
    assert len(flat) == 4 and len(set(flat)) == 4  # 5 questions, global batch 4: one dropped


def test_eval_set(vqa_files):
    cfg, _ = vqa_files
    tok = build_demo_tokenizer()
    ev = build_vqa_eval_set(cfg, tok, image_size=16)
    assert ev.images.shape == (3, 3, 16, 16) and ev.image_of.tolist() == [0, 1, 2]
    assert ev.question_ids == [10, 11, 12] and ev.answers[0] == ["red"] * 10
    assert ev.answer_list == ["red", "yes", "blue", "dark red"] and ev.answer_ids.shape[0] == 4
    sub = ev.subset(2)
    assert sub.questions == ev.questions[:2] and sub.answers == ev.answers[:2]
    # Without answers in the file: predictions only.
    test = json.load(open(cfg.vqa.eval_file))
    for t in test:
        del t["answer"]
    json.dump(test, open(cfg.vqa.eval_file, "w"))
    assert build_vqa_eval_set(cfg, tok, image_size=16).answers is None


def test_errors(vqa_files, tmp_path):
    cfg, train = vqa_files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(train[:1] + [{"question": "x?", "image": "coco/0.jpg"}]))  # no answer
    cfg.vqa.train_files = [str(bad)]
    with pytest.raises(DataError, match="entry 1"):
        build_vqa_train_index(cfg)
    cfg.vqa.train_files = [str(tmp_path / "nope.json")]
    with pytest.raises(DataError, match="not found"):
        build_vqa_train_index(cfg)
    cfg.vqa.train_files = []
    with pytest.raises(DataError, match="train_files"):
        build_vqa_train_index(cfg)
    cfg.vqa.answer_list = str(tmp_path / "none.json")
    with pytest.raises(DataError, match="answer list not found"):
        load_answer_list(cfg)
    (tmp_path / "bad.json").write_text('["red", "blue"')  # truncated file: a DataError, not a JSONDecodeError
    cfg.vqa.answer_list = str(tmp_path / "bad.json")
    with pytest.raises(DataError, match="answer list .*bad.json is not valid JSON"):
        load_answer_list(cfg)
    cfg.vqa.train_files, cfg.vqa.image_root = [str(tmp_path / "train.json")], str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="image_root"):
        build_vqa_train_index(cfg)


def test_kinds_cover_every_question_template():
    rng = np.random.default_rng(3)
    recs = make_questions([_sample_scene(rng) for _ in range(200)], ["i.jpg"] * 200, rng, len(KINDS), 0)
    starts = {" ".join(r["question"].split()[:2]) for r in recs}
    assert starts == {"what color", "what shape", "what size", "where is", "is there", "how many"}
