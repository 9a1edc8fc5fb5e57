"""Run the ORIGINAL BLIP task models' inference on jobs from tests/parity/test_task_inference.py.

    cd REPO && <ref venv>/bin/python -m tests.parity.run_original_tasks_inference JOBS.pt RESULTS.pt

Job kinds (each loads blipfast's export with `load_state_dict(strict=True)`):

* caption_generate: BLIP_Decoder.generate's body: prompt ids with [DEC] first and the trailing
  [SEP] dropped, `text_decoder.generate(...)` with the image tokens as encoder states. The one
  change: the image tokens are NOT repeat_interleave'd per beam by hand. transformers >= 4.27
  (4.46 here) expands them itself, and the original's manual expansion then fails with a
  shape error (LAVIS#211, BLIP#121); this is the documented fix. Sampling seeds the global RNG.
* vqa_generate: BLIP_VQA's inference='generate' body, with the same change.
* retrieval_rerank: the original evaluation loop (`train_retrieval.py::evaluation`, which is not
  in the package): features from the original modules, then per query its top-k by cosine and
  one ITM call per query on its k candidates; score = ITM match logit + cosine, -100 elsewhere.
* hf_table: HF's own `generate` (beam search / greedy) on a toy LM whose logits are a table
  indexed by (position, previous token, token): the scoring and stopping rules in isolation.

RESULTS.pt: {name: result dict, or {'error': traceback}}.
"""
import os
import sys
import traceback

import torch
import torch.nn as nn

from tests.parity.original_env import build


def caption_generate(job, workdir):
    model = build("caption", job["config"], workdir, prompt_ids=job["prompt_ids"])
    model.load_state_dict(job["state_dict"], strict=True)
    model.eval()
    tc = job["config"]["text"]
    out = {}
    with torch.no_grad():
        image_embeds = model.visual_encoder(job["images"])
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        ids = torch.tensor([job["prompt_ids"]] * job["images"].shape[0])
        ids[:, 0] = tc["dec_token_id"]
        ids = ids[:, :-1]  # as BLIP_Decoder.generate: drop the prompt's [SEP]
        for name, mode in job["modes"].items():
            kw = dict(max_length=mode["max_length"], min_length=mode["min_length"], eos_token_id=tc["sep_token_id"],
                      pad_token_id=tc["pad_token_id"], encoder_hidden_states=image_embeds, encoder_attention_mask=atts)
            if mode.get("sample"):
                torch.manual_seed(mode["seed"])
                seqs = model.text_decoder.generate(input_ids=ids, do_sample=True, top_p=mode["top_p"],
                                                   num_return_sequences=1, repetition_penalty=1.1, **kw)
            else:
                seqs = model.text_decoder.generate(input_ids=ids, num_beams=mode["num_beams"],
                                                   repetition_penalty=mode["repetition_penalty"], **kw)
            out[name] = seqs
    return out


def vqa_generate(job, workdir):
    model = build("vqa", job["config"], workdir)
    model.load_state_dict(job["state_dict"], strict=True)
    model.eval()
    tc = job["config"]["text"]
    q_ids, q_mask = job["question"]
    q_ids = q_ids.clone()
    q_ids[:, 0] = tc["enc_token_id"]
    with torch.no_grad():
        image_embeds = model.visual_encoder(job["images"])
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        q = model.text_encoder(q_ids, attention_mask=q_mask, encoder_hidden_states=image_embeds,
                               encoder_attention_mask=atts, return_dict=True).last_hidden_state
        q_atts = torch.ones(q.shape[:-1], dtype=torch.long)  # the original ignores question padding here
        bos = torch.full((q.shape[0], 1), tc["dec_token_id"], dtype=torch.long)
        seqs = model.text_decoder.generate(input_ids=bos, max_length=10, min_length=1, num_beams=3,
                                           eos_token_id=tc["sep_token_id"], pad_token_id=tc["pad_token_id"],
                                           encoder_hidden_states=q, encoder_attention_mask=q_atts)
    return {"answers": seqs}


def retrieval_rerank(job, workdir):
    import torch.nn.functional as F

    model = build("retrieval", job["config"], workdir)
    model.load_state_dict(job["state_dict"], strict=True)
    model.eval()
    tc = job["config"]["text"]
    ids, mask = job["text_ids"], job["text_mask"]
    k = job["k"]
    with torch.no_grad():
        text_out = model.text_encoder(ids, attention_mask=mask, return_dict=True, mode="text")
        text_embeds = F.normalize(model.text_proj(text_out.last_hidden_state[:, 0, :]), dim=-1)
        image_feats = model.visual_encoder(job["images"])
        image_embeds = F.normalize(model.vision_proj(image_feats[:, 0, :]), dim=-1)
        enc_ids = ids.clone()
        enc_ids[:, 0] = tc["enc_token_id"]
        sims = image_embeds @ text_embeds.t()
        i2t = torch.full(sims.shape, -100.0)
        for i in range(sims.shape[0]):
            topk_sim, topk_idx = sims[i].topk(k=k, dim=0)
            enc = image_feats[i].repeat(k, 1, 1)
            out = model.text_encoder(enc_ids[topk_idx], attention_mask=mask[topk_idx], encoder_hidden_states=enc,
                                     encoder_attention_mask=torch.ones(enc.shape[:-1], dtype=torch.long),
                                     return_dict=True)
            i2t[i, topk_idx] = model.itm_head(out.last_hidden_state[:, 0, :])[:, 1] + topk_sim
        sims = sims.t()
        t2i = torch.full(sims.shape, -100.0)
        for j in range(sims.shape[0]):
            topk_sim, topk_idx = sims[j].topk(k=k, dim=0)
            enc = image_feats[topk_idx]
            out = model.text_encoder(enc_ids[j].repeat(k, 1), attention_mask=mask[j].repeat(k, 1),
                                     encoder_hidden_states=enc,
                                     encoder_attention_mask=torch.ones(enc.shape[:-1], dtype=torch.long),
                                     return_dict=True)
            t2i[j, topk_idx] = model.itm_head(out.last_hidden_state[:, 0, :])[:, 1] + topk_sim
    return {"i2t": i2t, "t2i": t2i, "image_feat": image_embeds, "text_feat": text_embeds}


def hf_table(job, workdir):
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class TableLM(PreTrainedModel, GenerationMixin):
        config_class = PretrainedConfig

        def __init__(self, config, table):
            super().__init__(config)
            self.table = table
            self.unused = nn.Parameter(torch.zeros(1))  # PreTrainedModel wants a parameter

        def forward(self, input_ids=None, **kw):
            prev = torch.cat([input_ids[:, :1], input_ids[:, :-1]], 1)
            pos = torch.arange(input_ids.shape[1])
            return CausalLMOutput(logits=self.table[pos[None], prev, input_ids])

        def prepare_inputs_for_generation(self, input_ids, **kw):
            return {"input_ids": input_ids}

    out = {}
    for name, case in job["cases"].items():
        V = case["table"].shape[-1]
        m = TableLM(PretrainedConfig(vocab_size=V), case["table"]).eval()
        out[name] = m.generate(case["prompt"], num_beams=case["num_beams"], max_length=case["max_length"],
                               min_length=case["min_length"], eos_token_id=case["eos"], pad_token_id=0,
                               repetition_penalty=case["repetition_penalty"], do_sample=False, use_cache=False)
    return out


KINDS = {"caption_generate": caption_generate, "vqa_generate": vqa_generate, "retrieval_rerank": retrieval_rerank,
         "hf_table": hf_table}


def main(jobs_path, results_path):
    from tests.parity.original_env import init_process_group

    torch.set_num_threads(int(os.environ.get("BLIPFAST_REF_THREADS", "2")))
    jobs = torch.load(jobs_path, map_location="cpu", weights_only=True)
    workdir = os.path.dirname(os.path.abspath(results_path))
    init_process_group(workdir)
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = KINDS[job["kind"]](job, workdir)
        except Exception:  # reported per job, so one failure does not hide the others
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
