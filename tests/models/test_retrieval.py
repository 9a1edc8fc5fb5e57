"""Retrieval: the fine-tuning model (ITC with image ids, ITM with same-image-masked negatives) and
the evaluation (batched, sharded ITM re-ranking against a naive per-query loop)."""
import pytest
import torch
import torch.nn.functional as F

from blipfast.config import BlipConfig, TextConfig, VisionConfig
from blipfast.eval.retrieval import (
    evaluate,
    extract_features,
    load_features,
    merge_partial_scores,
    rerank_scores,
    save_features,
)
from blipfast.models.retrieval import BlipForRetrieval, all_gather_with_grad
from tests.helpers import sharpen_


def tiny_config(queue_size=16):
    return BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=16, width=32, depth=2, num_heads=2),
        text=TextConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=40, cls_token_id=2, sep_token_id=3,
                        dec_token_id=5, enc_token_id=6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        embed_dim=16, queue_size=queue_size, attention_backend="reference", loss_backend="reference",
    )


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = BlipForRetrieval(tiny_config(**kw))
    sharpen_(model, seed, temp=0.1)  # momentum copies = online weights
    return model


def make_texts(n, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 40, (n, L), generator=g)
    lengths = torch.randint(3, L + 1, (n,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids[:, 0] = 2
    ids[torch.arange(n), lengths - 1] = 3
    return ids.masked_fill(mask == 0, 0), mask


# -- evaluation -------------------------------------------------------------------------------


def naive_scores(model, images, ids, mask, k):
    """The original's loop: per query, its top-k by cosine, ITM one candidate at a time."""
    model.eval()
    with torch.no_grad():
        emb = model.visual_encoder(images)
        sims = model.image_features(emb) @ model.text_features(ids, mask).T
        i2t = torch.full(sims.shape, -100.0)
        t2i = torch.full(sims.T.shape, -100.0)
        for i in range(sims.shape[0]):
            val, top = sims[i].topk(k)
            for v, j in zip(val, top):
                logit = model.itm_logits(ids[j:j + 1], mask[j:j + 1], image_embeds=emb[i:i + 1])[0, 1]
                i2t[i, j] = logit + v
        for j in range(sims.shape[1]):
            val, top = sims[:, j].topk(k)
            for v, i in zip(val, top):
                logit = model.itm_logits(ids[j:j + 1], mask[j:j + 1], image_embeds=emb[i:i + 1])[0, 1]
                t2i[j, i] = logit + v
    return i2t, t2i


@pytest.fixture(scope="module")
def gallery():
    model = make_model()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = make_texts(9)
    feats = extract_features(model, images, (ids, mask), batch_size=4)
    return model, images, ids, mask, feats


def test_batched_rerank_equals_naive_loop(gallery):
    model, images, ids, mask, feats = gallery
    want_i2t, want_t2i = naive_scores(model, images, ids, mask, k=4)
    got_i2t, got_t2i = rerank_scores(model, feats, k_test=4, pair_batch=5)  # chunks span several queries
    torch.testing.assert_close(got_i2t, want_i2t, rtol=0, atol=2e-5)
    torch.testing.assert_close(got_t2i, want_t2i, rtol=0, atol=2e-5)
    assert ((got_i2t != -100).sum(1) == 4).all() and ((got_t2i != -100).sum(1) == 4).all()


def test_sharded_and_reloaded_scores_equal_single_rank(gallery, tmp_path):
    model, images, ids, mask, feats = gallery
    full = rerank_scores(model, feats, k_test=3)
    path = str(tmp_path / "feats.pt")
    save_features(feats, path)
    loaded = load_features(path)
    parts = [rerank_scores(model, loaded, k_test=3, rank=r, world_size=4, gather=False) for r in range(4)]
    merged = merge_partial_scores(parts)
    for a, b in zip(full, merged):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # batch composition changes rounding only
    with pytest.raises(ValueError, match="every row"):
        merge_partial_scores(parts[1:])


def test_k_test_capped_and_recall_keys(gallery):
    model, images, ids, mask, feats = gallery
    i2t, t2i = rerank_scores(model, feats, k_test=100)
    assert (i2t != -100).all() and (t2i != -100).all()
    txt2img = [j % 6 for j in range(9)]
    img2txt = [[j for j in range(9) if j % 6 == i] for i in range(6)]
    out = evaluate(model, feats, txt2img, img2txt, k_test=3)
    assert set(out) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    # Recall from the scores by hand, with every pair re-ranked (k_test capped at the gallery, so no
    # -100 ties): the rank of each image's best text (TR) and of each text's image (IR).
    out = evaluate(model, feats, txt2img, img2txt, k_test=100)
    for k in (1, 5, 10):
        tr = [min(sorted(range(9), key=lambda t: -i2t[i, t].item()).index(t) for t in img2txt[i]) < k for i in range(6)]
        ir = [sorted(range(6), key=lambda i: -t2i[j, i].item()).index(txt2img[j]) < k for j in range(9)]
        assert (out[f"txt_r{k}"], out[f"img_r{k}"]) == pytest.approx((100 * sum(tr) / 6, 100 * sum(ir) / 9)), k
    assert out["r_mean"] == pytest.approx(sum(out[f"{d}_r{k}"] for d in ("txt", "img") for k in (1, 5, 10)) / 6)


# -- fine-tuning model --------------------------------------------------------------------------


def test_forward_matches_reference_math():
    model = make_model(seed=3, queue_size=8)
    model.train()
    B = 4
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids, mask = make_texts(B, seed=2)
    idx = torch.tensor([10, 11, 10, 12])
    model.idx_queue[0, :4] = torch.tensor([11, -100, 12, 99])  # queued positives for ids 11 and 12
    queues = (model.image_queue.clone(), model.text_queue.clone(), model.idx_queue.clone())
    momentum_before = model.visual_encoder_m.patch_embed.proj.weight.clone()
    negatives = (torch.tensor([1, 0, 3, 2]), torch.tensor([3, 2, 1, 0]))
    alpha = 0.4
    out = model(images, ids, mask, alpha, idx, negatives=negatives)

    # The momentum encoders moved toward the online ones before use (online != momentum after sharpen_).
    assert not torch.equal(model.visual_encoder_m.patch_embed.proj.weight, momentum_before)
    model.eval()
    with torch.no_grad():
        emb = model.visual_encoder(images)
        v, t = model.image_features(emb), model.text_features(ids, mask)
        v_m = model.image_features(model.visual_encoder_m(images), momentum=True)
        t_m = model.text_features(ids, mask, momentum=True)
        temp = model.temp.item()
        iq, tq, idq = queues
        ids_all = torch.cat([idx, idq[0]])
        pos = (idx[:, None] == ids_all[None]).double()
        y = pos / pos.sum(1, keepdim=True)
        loss = 0.0
        for a, b_m, q in ((v, t_m, tq), (t, v_m, iq)):
            a_m = v_m if a is v else t_m
            s = a @ torch.cat([b_m.T, q], 1) / temp
            s_m = a_m @ torch.cat([b_m.T, q], 1) / temp
            tgt = alpha * s_m.softmax(1) + (1 - alpha) * y
            loss = loss + (-(F.log_softmax(s, 1) * tgt).sum(1).mean()) / 2
        torch.testing.assert_close(out.loss_itc.double(), loss.double(), rtol=1e-5, atol=1e-6)

        neg_img, neg_txt = negatives
        logits = torch.stack(
            [model.itm_logits(ids[b:b + 1], mask[b:b + 1], image_embeds=emb[b:b + 1])[0] for b in range(B)]
            + [model.itm_logits(ids[b:b + 1], mask[b:b + 1], image_embeds=emb[neg_img[b]][None])[0] for b in range(B)]
            + [model.itm_logits(ids[neg_txt[b]][None], mask[neg_txt[b]][None], image_embeds=emb[b:b + 1])[0]
               for b in range(B)])
        torch.testing.assert_close(out.itm_logits, logits, rtol=0, atol=2e-5)
        labels = torch.tensor([1] * B + [0] * 2 * B)
        torch.testing.assert_close(out.loss_itm, F.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)

    # Queues: this batch's momentum features and ids written at the pointer.
    assert model.idx_queue[0, :4].tolist() == idx.tolist() and int(model.ptr_queue[0]) == 4
    torch.testing.assert_close(model.image_queue[:, :4], v_m.T)
    torch.testing.assert_close(model.text_queue[:, :4], t_m.T)


def test_sampled_negatives_never_share_the_image_id():
    model = make_model(seed=4, queue_size=8)
    model.train()
    images = torch.randn(4, 3, 32, 32)
    ids, mask = make_texts(4, seed=4)
    idx = torch.tensor([7, 8, 7, 8])
    for _ in range(3):
        neg_img, neg_txt = model(images, ids, mask, 0.4, idx).negatives
        assert (idx[neg_img] != idx).all() and (idx[neg_txt] != idx).all()
    with pytest.raises(ValueError, match="hard negative|image id"):
        model(images, ids, mask, 0.4, torch.tensor([5, 5, 5, 5]))


def test_gradient_reaches_negative_images_and_bad_inputs():
    model = make_model(seed=5, queue_size=8)
    model.train()
    images = torch.randn(4, 3, 32, 32, requires_grad=True)
    ids, mask = make_texts(4, seed=5)
    # Rows B..2B of the ITM logits are (text i, negative image neg_img[i]): their gradient reaches
    # exactly the images used as negatives, and image 0 is none of them.
    neg_img = torch.tensor([1, 2, 3, 1])
    out = model(images, ids, mask, 0.4, torch.tensor([0, 1, 2, 3]), negatives=(neg_img, torch.tensor([1, 2, 3, 0])))
    out.itm_logits[4:8].sum().backward()
    per_image = images.grad.abs().flatten(1).sum(1)  # (4,)
    assert per_image[0] == 0 and bool((per_image[1:] > 0).all()), per_image
    with pytest.raises(ValueError, match="idx"):
        model(images, ids, mask, 0.4, torch.tensor([0.0, 1, 2, 3]))
    with pytest.raises(ValueError, match="negative indices"):
        model(images, ids, mask, 0.4, torch.arange(4), negatives=(torch.tensor([0, 1, 2, 9]),) * 2)


def test_state_dict_uses_official_names_and_detaches_momentum():
    model = make_model(queue_size=8)
    keys = set(model.state_dict())
    for k in ("temp", "itm_head.weight", "vision_proj.weight", "text_proj_m.bias", "idx_queue", "ptr_queue",
              "image_queue", "text_queue", "text_encoder.encoder.layer.0.crossattention.self.key.weight"):
        assert k in keys
    assert not any(k.startswith("text_decoder") for k in keys)
    holder = model.detach_momentum()
    assert set(model.state_dict()) | set(holder.state_dict()) == keys
    assert not set(model.state_dict()) & set(holder.state_dict())
    model.train()
    model(torch.randn(2, 3, 32, 32), *make_texts(2), 0.4, torch.tensor([0, 1]))  # still works detached
    assert int(holder.ptr_queue[0]) == 2


def _gather_worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = all_gather_with_grad(x)  # (4, 3)
    w = torch.arange(12.0).view(4, 3) * (rank + 1)  # each rank weights the gathered rows differently
    (y * w).sum().backward()
    torch.save({"y": y.detach(), "grad": x.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_all_gather_with_grad_sums_every_ranks_gradient(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), out), nprocs=2)
    base = torch.arange(12.0).view(4, 3)
    for rank in range(2):
        res = torch.load(f"{out}.{rank}")
        assert torch.equal(res["y"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]))
        # d/dx_r of sum_ranks (y * w_rank) = (w_0 + w_1)[rows of rank r] = 3 * base[rows]
        assert torch.equal(res["grad"], 3 * base[2 * rank:2 * rank + 2])


def test_evaluation_cli_saves_and_reuses_features(tmp_path):
    import json

    import yaml

    from blipfast.data import generate_synthetic
    from blipfast.eval.retrieval import main

    generate_synthetic(str(tmp_path / "data"), num_train=4, num_val=5, seed=0, image_size=32)
    cfg = tiny_config()
    cfg.text.vocab_size, cfg.text.max_position_embeddings = 128, 40  # the demo tokenizer's vocabulary
    torch.manual_seed(0)
    torch.save(BlipForRetrieval(cfg).state_dict(), tmp_path / "ret.pt")
    model = {k: v for k, v in cfg.to_dict().items()}
    config = {"model": model,
              "data": {"format": "synthetic", "synthetic": {"out_dir": str(tmp_path / "data"), "num_train": 4,
                                                            "num_val": 5, "image_size": 32},
                       "backend": "torch", "tokenizer": "demo", "cache_dir": str(tmp_path / "cache")},
              "eval": {"checkpoint": str(tmp_path / "ret.pt"), "k_test": 3, "features": str(tmp_path / "f.pt"),
                       "output": str(tmp_path / "out.json"), "device": "cpu"}}
    with open(tmp_path / "eval.yaml", "w") as f:
        yaml.safe_dump(config, f)
    assert main(["--config", str(tmp_path / "eval.yaml")]) == 0
    first = json.load(open(tmp_path / "out.json"))
    feats = load_features(str(tmp_path / "f.pt"))
    assert feats["image_feat"].shape[0] == 5 and feats["text_feat"].shape[0] == 10  # val: 2 captions per image
    assert main(["--config", str(tmp_path / "eval.yaml"), "eval.k_test=3"]) == 0  # features reloaded
    assert json.load(open(tmp_path / "out.json")) == first and set(first) >= {"txt_r1", "img_r1", "r_mean"}
    assert main(["--config", str(tmp_path / "eval.yaml"), "eval.nonsense=1"]) == 2
