"""blipfast.load over every checkpoint layout, and the Predictor's features and scores held to the
task models' own computations (tiny random models, the demo vocabulary)."""

import pytest
import torch

import blipfast
from blipfast.api import LayoutError, Predictor
from blipfast.config import BlipConfig, from_dict
from blipfast.convert import export_hf, export_original_state_dict
from blipfast.data import build_demo_tokenizer
from blipfast.models import BlipForCaptioning, BlipForPretraining, BlipForRetrieval, BlipForVQA
from tests.dist.train_common import make_batch, tiny_model_config, train_config
from tests.helpers import sharpen_, tiny_model

MODEL = tiny_model(depth=2)
# Heads are not in the weights, and 32 is no released BLIP width: tell the loader.
HEADS = {"vision.num_heads": 2, "text.num_attention_heads": 2, "attention_backend": "reference",
         "loss_backend": "reference"}
TEXTS = ["a red circle", "a large blue square on the left", "there is a green triangle", "a small object",
         "a yellow circle at the top"]


def cfg():
    return from_dict(BlipConfig, MODEL)


def make(cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(cfg(), **kw)
    sharpen_(model, seed, temp=0.1)  # outputs that differ across inputs
    return model.eval()


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """A retrieval model saved as an official .pth (0-dim temp, position_ids, official wrapper)."""
    model = make(BlipForRetrieval)
    path = str(tmp_path_factory.mktemp("official") / "model_retrieval.pth")
    torch.save({"model": export_original_state_dict(model)}, path)
    return model, path


@pytest.fixture(scope="module")
def predictor(retrieval):
    return blipfast.load(retrieval[1], tokenizer="demo", overrides=HEADS)


# -- layouts -----------------------------------------------------------------------------------


def test_official_pth(retrieval, predictor):
    model, _ = retrieval
    assert isinstance(predictor, Predictor) and predictor.layout == "official" and predictor.task == "retrieval"
    assert isinstance(predictor.model, BlipForRetrieval) and not predictor.model.training
    same_weights(predictor.model, model)
    assert predictor.config.vision.image_size == 32 and predictor.config.text.enc_token_id == 6


def test_blipfast_export_any_task_and_config_file(tmp_path):
    model = make(BlipForPretraining)
    path = str(tmp_path / "export.pth")
    torch.save({"model": model.state_dict()}, path)  # what `blipfast.train.export --format blipfast` writes
    build_demo_tokenizer(str(tmp_path))  # vocab.txt beside the weights is found
    p = blipfast.load(path, overrides=HEADS)
    assert p.layout == "blipfast" and p.task == "pretrain" and isinstance(p.model, BlipForPretraining)
    same_weights(p.model, model)
    # A pre-training checkpoint serves every task model; a config file instead of overrides.
    import yaml

    (tmp_path / "model.yaml").write_text(yaml.safe_dump(MODEL))
    for task, cls, shared in (("retrieval", BlipForRetrieval, "itm_head.weight"),
                              ("captioning", BlipForCaptioning, "text_decoder.cls.predictions.bias"),
                              ("vqa", BlipForVQA, "text_encoder.encoder.layer.1.crossattention.self.key.weight")):
        p = blipfast.load(path, task=task, config=str(tmp_path / "model.yaml"))
        assert isinstance(p.model, cls), task
        assert torch.equal(p.model.state_dict()[shared], model.state_dict()[shared]), task


def test_hf_directory(tmp_path, tok):
    model = make(BlipForRetrieval)
    export_hf(model, str(tmp_path / "hf"))
    tok.save_pretrained(str(tmp_path / "hf"))
    p = blipfast.load(str(tmp_path / "hf"), overrides={"attention_backend": "reference"})
    assert p.layout == "hf" and p.task == "retrieval"
    want = model.state_dict()
    for k, v in p.model.state_dict().items():
        if k.split(".")[0] in ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"):
            assert torch.equal(v, want[k]), k
    x = images(2)
    torch.testing.assert_close(p.itm_score(x, TEXTS), blipfast.load(  # same numbers as the original layout
        _official(tmp_path, model), tokenizer="demo", overrides=HEADS).itm_score(x, TEXTS), rtol=0, atol=1e-6)
    with pytest.raises(LayoutError, match="not caption"):
        blipfast.load(str(tmp_path / "hf"), task="caption")


def _official(tmp_path, model):
    path = str(tmp_path / "official.pth")
    torch.save({"model": export_original_state_dict(model)}, path)
    return path


def test_training_output_directory(tmp_path, tok):
    from blipfast.data import DataConfig
    from blipfast.train.config import RunConfig
    from blipfast.train.trainer import Trainer

    class OneBatch:  # the trainer's loader interface: one fixed batch per epoch
        def __len__(self):
            return 1

        def epoch(self, epoch, start_step=0):
            yield from [make_batch(0, 0, 0)][start_step:]

    run = RunConfig(model=tiny_model_config(), data=DataConfig(tokenizer="demo"),
                    train=train_config(str(tmp_path / "run"), max_steps=1, warmup_steps=0),
                    deepspeed={"zero_optimization": {"stage": 0}}, source="<test>", deepspeed_path="<test>",
                    task="retrieval")
    tr = Trainer(run, loader=OneBatch(), tokenizer=tok)
    tr.fit()
    p = blipfast.load(run.train.output_dir)
    assert p.layout == "run" and p.task == "retrieval" and isinstance(p.model, BlipForRetrieval)
    want = tr.full_state_dict()
    for k, v in p.model.state_dict().items():
        assert torch.equal(v, want[k].to(v.dtype)), k


def test_wrong_layouts_name_what_was_found(tmp_path, retrieval):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    with pytest.raises(LayoutError, match=r"neither a training output directory.*readme.txt"):
        blipfast.load(str(tmp_path / "notes"))
    with pytest.raises(FileNotFoundError):
        blipfast.load(str(tmp_path / "absent.pth"))
    torch.save({"model": {"encoder.weight": torch.zeros(2), "classifier.bias": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(LayoutError, match=r"top-level modules \['classifier', 'encoder'\] match no blipfast model"):
        blipfast.load(str(tmp_path / "x.pth"), tokenizer="demo")
    cap = make(BlipForCaptioning)
    torch.save({"model": cap.state_dict()}, tmp_path / "cap.pth")
    with pytest.raises(LayoutError, match=r"task 'retrieval' needs .*caption checkpoint without itm_head"):
        blipfast.load(str(tmp_path / "cap.pth"), task="retrieval", tokenizer="demo", overrides=HEADS)
    with pytest.raises(LayoutError, match="unknown task 'nlvr'"):
        blipfast.load(retrieval[1], task="nlvr")
    with pytest.raises(LayoutError, match="no tokenizer found"):
        blipfast.load(retrieval[1])
    with pytest.raises(LayoutError, match="heads is not stored in the weights"):
        blipfast.load(retrieval[1], tokenizer="demo")
    # Never unpickles arbitrary objects.
    torch.save({"model": cap.state_dict(), "args": _Opaque()}, tmp_path / "pickled.pth")
    with pytest.raises(LayoutError, match="weights_only=True"):
        blipfast.load(str(tmp_path / "pickled.pth"), tokenizer="demo")
    (tmp_path / "garbage.pth").write_bytes(b"hello, not a checkpoint")
    with pytest.raises(LayoutError, match="garbage.pth is not a torch checkpoint"):
        blipfast.load(str(tmp_path / "garbage.pth"), tokenizer="demo")
    # An HF weights file outside its directory is recognised, not misread.
    export_hf(make(BlipForCaptioning), str(tmp_path / "hf"))
    with pytest.raises(LayoutError, match="HF transformers BLIP weights"):
        blipfast.load(str(tmp_path / "hf" / "model.safetensors"), tokenizer="demo")


class _Opaque:
    pass


# -- features and scores equal the models' own computations ------------------------------------


def test_features_equal_model_internals(predictor, tok):
    m, x = predictor.model, images(3)
    ids, mask = _tok(tok, TEXTS)
    with torch.no_grad():
        emb = m.visual_encoder(x)
        want_img, want_txt = m.image_features(emb), m.text_features(ids, mask)
        want_mm = m.text_encoder(m.with_first_token(ids, 6), mask, image_embeds=emb[:1].expand(len(TEXTS), -1, -1))
    f = predictor.encode_image(x, batch_size=2)  # batched: 2 + 1
    assert not f.feat.requires_grad
    torch.testing.assert_close(f.embeds, emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(f.feat, want_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(f.feat.norm(dim=-1), torch.ones(3))
    t = predictor.encode_text(TEXTS, batch_size=2)
    torch.testing.assert_close(t.feat, want_txt, rtol=0, atol=1e-6)
    assert torch.equal(t.attention_mask, mask) and t.embeds.shape == (5, ids.shape[1], 32)
    mm = predictor.encode_multimodal(x[:1], TEXTS)  # one image, every text
    torch.testing.assert_close(mm.embeds, want_mm, rtol=0, atol=1e-5)
    pairs = predictor.encode_multimodal(x, TEXTS[:3], batch_size=2)
    with torch.no_grad():
        ids3, mask3 = _tok(tok, TEXTS[:3])
        want = m.text_encoder(m.with_first_token(ids3, 6), mask3, image_embeds=emb)
    torch.testing.assert_close(pairs.embeds, want, rtol=0, atol=1e-5)
    assert predictor.encode_image(x, grad=True).feat.requires_grad


def _tok(tok, texts):
    enc = tok(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def test_vqa_multimodal_is_the_question_encoder(tmp_path, tok):
    model = make(BlipForVQA)
    torch.save({"model": model.state_dict()}, tmp_path / "vqa.pth")
    p = blipfast.load(str(tmp_path / "vqa.pth"), tokenizer="demo", overrides=HEADS)
    x = images(2)
    ids, mask = _tok(tok, TEXTS[:2])
    with torch.no_grad():
        want = model.encode_question(x, ids, mask)
    torch.testing.assert_close(p.encode_multimodal(x, TEXTS[:2]).embeds, want, rtol=0, atol=1e-5)
    assert p.encode_image(x).feat is None  # no ITC projection in a VQA model
    with pytest.raises(ValueError, match="itc_score needs vision_proj, text_proj"):
        p.itc_score(x, TEXTS)


def test_itc_and_itm_equal_the_retrieval_model(predictor, tok):
    from blipfast.eval.retrieval import extract_features, rerank_scores

    m, x = predictor.model, images(3)
    ids, mask = _tok(tok, TEXTS)
    feats = extract_features(m, x, (ids, mask), batch_size=2)
    itc = predictor.itc_score(x, TEXTS)
    torch.testing.assert_close(itc, feats["image_feat"] @ feats["text_feat"].T, rtol=0, atol=1e-6)
    logit = predictor.itm_score(x, TEXTS, logits=True)  # (3, 5)
    with torch.no_grad():
        for i in range(3):
            for j in range(5):
                want = m.itm_logits(ids[j:j + 1], mask[j:j + 1], image_embeds=m.visual_encoder(x[i:i + 1]))[0, 1]
                torch.testing.assert_close(logit[i, j], want, rtol=0, atol=1e-5)
    # The original's retrieval score (ITM logit + ITC cosine) over the whole re-ranked matrix.
    i2t, _ = rerank_scores(m, feats, k_test=5, pair_batch=4)
    torch.testing.assert_close(logit + itc, i2t, rtol=0, atol=1e-5)
    prob = predictor.itm_score(x, TEXTS)
    torch.testing.assert_close(prob, torch.sigmoid(logit - _nonmatch(m, x, ids, mask)), rtol=0, atol=1e-5)
    # Pairs, and one image against many texts.
    torch.testing.assert_close(predictor.itm_score(x, TEXTS[:3], pairwise=True), prob.diagonal(), rtol=0, atol=1e-6)
    torch.testing.assert_close(predictor.itm_score(x[1:2], TEXTS, pairwise=True), prob[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(predictor.itc_score(x, TEXTS[:3], pairwise=True), itc.diagonal(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="as many images as texts"):
        predictor.itm_score(x, TEXTS, pairwise=True)


def _nonmatch(m, x, ids, mask):
    with torch.no_grad():
        emb = m.visual_encoder(x)
        return torch.stack([m.itm_logits(ids, mask, image_embeds=emb[i:i + 1].expand(len(ids), -1, -1))[:, 0]
                            for i in range(x.shape[0])])


def test_one_image_many_texts_runs_vit_and_kv_once(predictor):
    """A (2 images x 5 texts) ITM matrix: the ViT sees 2 images and each layer's cross-attention
    key projection 2 images' tokens, not 10 pairs'."""
    m, seen = predictor.model, {"vit": 0, "key": 0}
    hooks = [m.visual_encoder.register_forward_hook(lambda mod, a, o: seen.__setitem__("vit", seen["vit"] + o.shape[0])),
             m.text_encoder.encoder.layer[0].crossattention.self.key.register_forward_hook(
                 lambda mod, a, o: seen.__setitem__("key", seen["key"] + o.shape[0]))]
    predictor.pair_batch = 4  # pair chunks that straddle images
    try:
        predictor.itm_score(images(2), TEXTS)
    finally:
        predictor.pair_batch = 128
        for h in hooks:
            h.remove()
    assert seen == {"vit": 2, "key": 2}


def test_image_inputs_paths_and_pil(tmp_path, predictor):
    from PIL import Image

    from blipfast.data.torch_pipeline import eval_image

    paths = []
    for i, c in enumerate([(200, 30, 30), (30, 30, 200)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (50, 40), c).save(p)
        paths.append(str(p))
    want = torch.stack([torch.from_numpy(eval_image(open(p, "rb").read(), 32)) for p in paths])
    got = predictor.encode_image(paths).feat
    torch.testing.assert_close(got, predictor.encode_image(want).feat, rtol=0, atol=1e-6)
    torch.testing.assert_close(predictor.encode_image(Image.open(paths[1])).feat, got[1:], rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        predictor.encode_image([str(tmp_path / "nowhere.png")])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        predictor.encode_image([str(tmp_path / "bad.jpg")])
    with pytest.raises(ValueError, match="must be 32x32"):
        predictor.encode_image(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError, match="texts must be a string or a list of strings"):
        predictor.encode_text([1, 2])


def test_zero_shot_classifier_mechanics(predictor):
    """The ensemble is the normalised mean of the prompts' features; ITM re-ranking rescores
    exactly the top-k by (mean ITM logit over templates + ITC cosine)."""
    names, templates = ["circle", "square", "triangle"], ["a {}", "there is a {}"]
    clf = predictor.zero_shot_classifier(names, templates=templates)
    feats = predictor.encode_text([t.format(c) for c in names for t in templates]).feat.view(3, 2, -1)
    torch.testing.assert_close(clf.class_feat, torch.nn.functional.normalize(feats.mean(1), dim=-1))
    x = images(4)
    plain = clf.classify(x)
    img = predictor.encode_image(x).feat
    torch.testing.assert_close(plain.itc, img @ clf.class_feat.T, rtol=0, atol=1e-6)
    assert plain.indices.tolist() == plain.itc.argmax(1).tolist()
    rr = clf.classify(x, top_k_itm=2, batch_size=3)
    assert torch.equal(rr.candidates, plain.itc.topk(2, dim=1).indices)
    for i in range(4):
        for j, c in enumerate(rr.candidates[i].tolist()):
            prompts = [t.format(names[c]) for t in templates]
            want = predictor.itm_score(x[i:i + 1], prompts, logits=True)[0].mean()
            torch.testing.assert_close(rr.itm[i, j], want, rtol=0, atol=1e-5)
            torch.testing.assert_close(rr.scores[i, c], want + plain.itc[i, c], rtol=0, atol=1e-5)
    assert rr.labels == [names[i] for i in rr.scores.argmax(1).tolist()]
    with pytest.raises(ValueError, match="exactly one"):
        predictor.zero_shot_classifier(names, templates=["no slot"])
    with pytest.raises(ValueError, match="top_k_itm must be in"):
        clf.classify(x, top_k_itm=4)
