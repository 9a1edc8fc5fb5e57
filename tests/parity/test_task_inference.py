"""Task inference against the ORIGINAL BLIP code and the transformers version it runs with (4.46
in the reference venv): caption tokens (beam search, greedy, nucleus sampling with the same
seed), VQA answer generation, retrieval re-ranking scores, and beam search / greedy on toy
models where only the generation rules matter.

Training losses, gradients and VQA answer ranking of the same models are compared in
test_task_training.py. One subprocess runs every original-code job.
"""
from types import SimpleNamespace

import pytest
import torch

from blipfast.convert.original import export_original_state_dict
from blipfast.eval.retrieval import extract_features, rerank_scores
from blipfast.generation import beam_search, greedy_search
from blipfast.models.caption import BlipForCaptioning
from blipfast.models.retrieval import BlipForRetrieval
from blipfast.models.vqa import BlipForVQA
from tests.parity import harness as H
from tests.parity.harness import odd_config
from tests.test_generation import TableStepper

pytestmark = pytest.mark.parity

PROMPT = [1, 10, 11, 12, 2]  # what "a picture of " tokenises to here: [CLS] 3 words [SEP] (odd_config ids)
CAPTION_MODES = {
    "beam3": dict(num_beams=3, max_length=20, min_length=5, repetition_penalty=1.0),  # COCO evaluation
    "beam3_penalty": dict(num_beams=3, max_length=16, min_length=9, repetition_penalty=1.5),
    "greedy": dict(num_beams=1, max_length=20, min_length=5, repetition_penalty=1.0),
    "sample": dict(sample=True, seed=7, top_p=0.9, max_length=20, min_length=5),  # CapFilt's captioner
}


class PromptTokenizer:
    """Stands in for the tokenizer where only the prompt's ids matter."""

    def __call__(self, text, return_tensors=None):
        return SimpleNamespace(input_ids=torch.tensor([PROMPT]) if return_tensors else list(PROMPT))


def table_cases():
    cases = {}
    for trial in range(24):
        g = torch.Generator().manual_seed(100 + trial)
        table = 2.5 * torch.randn(9, 12, 12, 12, generator=g)
        table[..., 3] += 1.0  # EOS (3) likely enough that hypotheses finish at various lengths
        cases[f"t{trial}"] = {"table": table, "prompt": torch.randint(4, 12, (4, 3), generator=g),
                              "num_beams": 1 if trial % 6 == 5 else 3, "max_length": 9, "min_length": 4,
                              "eos": 3, "repetition_penalty": 1.3 if trial % 2 else 1.0}
    return cases


def make_jobs():
    cfg = odd_config()
    g = torch.Generator().manual_seed(0)
    models, jobs = {}, {}

    cap = BlipForCaptioning(cfg, tokenizer=PromptTokenizer())
    H.sharpen_model_(cap, seed=21)
    models["caption"] = cap
    jobs["caption"] = {"kind": "caption_generate", "prompt_ids": PROMPT, "images": torch.randn(4, 3, 48, 48, generator=g),
                       "modes": CAPTION_MODES}

    vqa = BlipForVQA(cfg)
    H.sharpen_model_(vqa, seed=22)
    models["vqa"] = vqa
    jobs["vqa"] = {"kind": "vqa_generate", "images": torch.randn(3, 3, 48, 48, generator=g),
                   "question": H.make_text(cfg, [7, 11, 5], g)}

    ret = BlipForRetrieval(cfg)
    H.sharpen_model_(ret, seed=23, temp=0.1)
    models["retrieval"] = ret
    ids, mask = H.make_text(cfg, [5, 9, 7, 12, 4, 9, 6, 8], g)
    jobs["retrieval"] = {"kind": "retrieval_rerank", "images": torch.randn(5, 3, 48, 48, generator=g),
                         "text_ids": ids, "text_mask": mask, "k": 3}
    with torch.no_grad():  # a likelier EOS: some sequences finish early, others run to max_length
        for m in (cap, vqa):
            m.text_decoder.cls.predictions.bias[cfg.text.sep_token_id] += 4.0
    for name, m in models.items():
        m.eval()
        jobs[name].update(config=cfg.to_dict(), state_dict=export_original_state_dict(m))
    jobs["table"] = {"kind": "hf_table", "cases": table_cases()}
    return models, jobs


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    models, jobs = make_jobs()
    work = str(tmp_path_factory.mktemp("tasks_inference"))
    return models, jobs, H.run_reference(jobs, work, script="tests.parity.run_original_tasks_inference")


@pytest.mark.parametrize("mode", sorted(CAPTION_MODES))
def test_caption_tokens_match_original(parity, mode):
    models, jobs, results = parity
    ref = H.job_result(results, "caption")[mode]
    m, job = models["caption"], jobs["caption"]
    kw = dict(CAPTION_MODES[mode])
    if kw.pop("sample", False):
        gen = torch.Generator().manual_seed(kw.pop("seed"))  # the original seeds the global RNG alike
        ours = m.generate_ids(job["images"], sample=True, generator=gen, **kw)
    else:
        ours = m.generate_ids(job["images"], **kw)
    assert ours.tolist() == ref.tolist()


def test_vqa_generated_answers_match_original(parity):
    models, jobs, results = parity
    ref = H.job_result(results, "vqa")["answers"]
    job = jobs["vqa"]
    ours = models["vqa"].generate_ids(job["images"], *job["question"])
    assert ours.tolist() == ref.tolist()


def test_retrieval_rerank_matches_original_loop(parity):
    models, jobs, results = parity
    ref = H.job_result(results, "retrieval")
    job = jobs["retrieval"]
    feats = extract_features(models["retrieval"], job["images"], (job["text_ids"], job["text_mask"]), batch_size=3)
    H.compare({"image_feat": feats["image_feat"], "text_feat": feats["text_feat"]},
              {"image_feat": ref["image_feat"], "text_feat": ref["text_feat"]}, 1e-5, "retrieval features")
    i2t, t2i = rerank_scores(models["retrieval"], feats, k_test=job["k"], pair_batch=4)
    assert torch.equal(i2t == -100, ref["i2t"] == -100) and torch.equal(t2i == -100, ref["t2i"] == -100)  # same top-k
    H.compare({"i2t": i2t, "t2i": t2i}, {"i2t": ref["i2t"], "t2i": ref["t2i"]}, 1e-5, "re-ranked scores")


def test_beam_search_and_greedy_rules_match_transformers_446(parity):
    _, jobs, results = parity
    ref = H.job_result(results, "table")
    bad = []
    for name, case in jobs["table"]["cases"].items():
        args = (TableStepper(case["table"]), case["prompt"])
        kw = dict(max_length=case["max_length"], min_length=case["min_length"], eos_token_id=case["eos"],
                  pad_token_id=0, repetition_penalty=case["repetition_penalty"])
        if case["num_beams"] == 1:
            ours = greedy_search(*args, **kw)
        else:
            ours = beam_search(*args, case["num_beams"], **kw)
        if ours.tolist() != ref[name].tolist():
            bad.append((name, ours.tolist(), ref[name].tolist()))
    assert not bad, f"{len(bad)} of {len(ref)} cases differ; first: {bad[0]}"
