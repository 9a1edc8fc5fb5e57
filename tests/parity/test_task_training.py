"""blipfast's task models against the ORIGINAL BLIP code (PyPI blip-vit), in fp32:
BlipForRetrieval vs `blip_retrieval.py` (local and all-rank negatives), BlipForCaptioning vs
`blip.py`'s BLIP_Decoder, BlipForVQA vs `blip_vqa.py` (training loss and answer ranking).

Same harness and tolerances as test_pretraining.py: blipfast's weights (sharp scale, dropout
0) exported to the official layout and loaded strictly by the original; one subprocess runs all
original-code jobs; the original's hard negatives are replayed.
"""
import pytest
import torch

from blipfast.convert.original import export_original_state_dict, load_original_state_dict
from blipfast.models.caption import BlipForCaptioning
from blipfast.models.retrieval import BlipForRetrieval
from blipfast.models.vqa import BlipForVQA
from tests.parity import harness as H
from tests.parity.harness import odd_config

pytestmark = pytest.mark.parity

OUT_TOL, GRAD_TOL, GRAD_FLOOR = 1e-5, 1e-4, 1e-3
ALPHA = 0.4
PROMPT_LENGTH = 4  # "[DEC] a picture of": the captioner's prompt tokens, masked from the loss


def retrieval_batch(cfg, lengths, idx, seed):
    batch = H.make_batch(cfg, lengths, seed)
    batch["idx"] = torch.tensor(idx)
    return batch


def vqa_batch(cfg, q_lengths, n, a_lengths, seed):
    g = torch.Generator().manual_seed(seed)
    batch = H.make_batch(cfg, q_lengths, seed)
    answers = H.make_text(cfg, a_lengths, g)
    batch["texts"] = [batch["texts"][0], answers]  # the original tokenises questions, then answers
    batch["n"] = torch.tensor(n)
    batch["weights"] = torch.rand(sum(n), generator=g) + 0.1
    return batch


def make_jobs():
    """{name: (blipfast model, job for run_original.py, extras)}."""
    cfg = odd_config()
    out = {}
    for name, all_rank, steps in (("retrieval_local", False, 2), ("retrieval_all_rank", True, 1)):
        model = BlipForRetrieval(cfg, negative_all_rank=all_rank)
        H.sharpen_model_(model, seed=11, queue_ptr=15)
        with torch.no_grad():  # stored image ids, some equal to the batch's: positives in the queue
            model.idx_queue.copy_(torch.randint(0, 12, model.idx_queue.shape, generator=torch.Generator().manual_seed(5)))
        batches = [retrieval_batch(cfg, [11, 7, 4, 11, 9], [3, 7, 3, 9, 1], 20),
                   retrieval_batch(cfg, [6, 11, 11, 3, 8], [2, 2, 5, 8, 7], 21)][:steps]
        out[name] = (model, {"kind": "retrieval", "init": {"negative_all_rank": all_rank}, "batches": batches,
                             "alpha": ALPHA})

    model = BlipForCaptioning(cfg)
    H.sharpen_model_(model, seed=12)
    prompt = [cfg.text.cls_token_id, 10, 11, 12, cfg.text.sep_token_id]  # tokenised prompt: P = 4
    batch = H.make_batch(cfg, [9, 12, 6, 12], 30)
    batch["prompt_length"] = PROMPT_LENGTH
    out["caption"] = (model, {"kind": "caption", "prompt_ids": prompt, "batches": [batch]})

    model = BlipForVQA(cfg)
    H.sharpen_model_(model, seed=13)
    g = torch.Generator().manual_seed(41)
    question = H.make_text(cfg, [7, 11, 5], g)
    answer_ids, answer_mask = H.make_text(cfg, [4] * 8, g)  # equal lengths: the content decides
    answer_ids[:, 0] = cfg.text.dec_token_id  # the original's caller (train_vqa.py) sets [DEC] itself
    rank = {"images": torch.randn(3, 3, 48, 48, generator=g), "question": question, "answer_ids": answer_ids,
            "answer_mask": answer_mask, "k": 5}
    out["vqa"] = (model, {"kind": "vqa", "batches": [vqa_batch(cfg, [7, 11, 5], [2, 1, 3], [3, 4, 3, 5, 4, 3], 40)],
                          "rank": rank})
    for model, job, *_ in out.values():
        job.update(config=cfg.to_dict(), weights="state_dict", adamw=H.ADAMW,
                   state_dict=export_original_state_dict(model))
    return out


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    H.require_reference()
    jobs = make_jobs()
    results = H.run_reference({name: job for name, (_, job) in jobs.items()}, str(tmp_path_factory.mktemp("tasks")))
    return jobs, results


def fresh(model):
    """A new model of the same class and config, loaded from the export (the converter's path)."""
    kwargs = {"negative_all_rank": model.negative_all_rank} if isinstance(model, BlipForRetrieval) else {}
    new = type(model)(model.config, **kwargs)
    load_original_state_dict(new, export_original_state_dict(model))
    return new


def check(parity, name):
    (model, job), results = parity[0][name], parity[1]
    ref = H.job_result(results, name)
    assert ref["strict_load"] == "ok"
    ours_layout = {k: (tuple(v.shape), str(v.dtype)) for k, v in job["state_dict"].items()}
    assert ours_layout == ref["original_layout"], f"{name}: exported layout differs from the original's"
    m = fresh(model)
    ours = H.run_blipfast_steps(m, job["batches"], [H.negatives_of(s) for s in ref["steps"]], job.get("alpha", 0.0),
                                kind=job["kind"])
    for i, (o, r) in enumerate(zip(ours, ref["steps"])):
        keys = [k for k in r if isinstance(r[k], torch.Tensor) and not k.startswith("neg_")]
        H.compare({k: o[k] for k in keys}, {k: r[k] for k in keys}, OUT_TOL, f"{name}, step {i + 1}: outputs and losses")
        H.compare(o["momentum"], r["momentum"], OUT_TOL, f"{name}, step {i + 1}: momentum weights")
        H.compare(o["buffers"], r["buffers"], OUT_TOL, f"{name}, step {i + 1}: queues")
    H.compare(ours[0]["grads"], ref["steps"][0]["grads"], GRAD_TOL, f"{name}: gradients", floor_frac=GRAD_FLOOR)
    return m, ref


def test_retrieval_local_negatives(parity):
    """ITC with image-id positives (in batch and in the id queue), ITM over same-rank negatives,
    gradients; after an AdamW step, the momentum weights and the image, text and id queues."""
    check(parity, "retrieval_local")


def test_retrieval_all_rank_negatives(parity):
    """negative_all_rank=True (COCO): negatives from the gathered batch (one process here)."""
    check(parity, "retrieval_all_rank")


def test_captioning_loss(parity):
    """BLIP_Decoder's LM loss (prompt tokens masked, label smoothing 0.1) and its gradients."""
    check(parity, "caption")


def test_vqa_loss_and_answer_ranking(parity):
    """BLIP_VQA's weighted answer loss and gradients, and rank_answer's choice among a list."""
    model, ref = check(parity, "vqa")
    r = parity[0]["vqa"][1]["rank"]
    model.eval()
    ranked = model.rank_answers(r["images"], r["question"][0], r["question"][1], r["answer_ids"], r["answer_mask"],
                                k=r["k"])
    assert torch.equal(ranked, ref["ranked"]), f"answers {ranked.tolist()} vs the original's {ref['ranked'].tolist()}"
