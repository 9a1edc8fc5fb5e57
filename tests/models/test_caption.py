"""Captioning model (prompt-masked LM loss, generation with the prompt stripped) and the caption
metrics (BLEU / CIDEr through pycocoevalcap's scorers, Python PTB-style tokenization)."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from blipfast.config import BlipConfig, TextConfig, VisionConfig
from blipfast.data import build_demo_tokenizer
from blipfast.eval.caption_metrics import caption_scores, simple_ptb_tokenize
from blipfast.models.caption import BlipForCaptioning
from tests.helpers import sharpen_


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


def small_config():
    return BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=16, width=32, depth=2, num_heads=2),
        text=TextConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=48, cls_token_id=2, sep_token_id=3,
                        dec_token_id=5, enc_token_id=6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        embed_dim=16, queue_size=16, attention_backend="reference", loss_backend="reference",
    )


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = BlipForCaptioning(small_config(), tokenizer=tok)
    sharpen_(m, 0)
    return m.eval()


def test_prompt_length_and_names(model, tok):
    assert model.prompt_length == 4  # [DEC] a picture of
    keys = set(model.state_dict())
    assert "text_decoder.cls.predictions.bias" in keys and "visual_encoder.pos_embed" in keys
    assert all(k.startswith(("visual_encoder.", "text_decoder.bert.", "text_decoder.cls.")) for k in keys)


def test_loss_skips_prompt_and_padding(model):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = model.tokenize(["a red circle on the left", "a blue square"])
    assert ids.shape[0] == 2 and (mask[1] == 0).any()  # padded to the longest
    loss = model(images, ids, mask)

    dec_ids = ids.clone()
    dec_ids[:, 0] = 5
    h = model.text_decoder(dec_ids, mask, image_embeds=model.visual_encoder(images))
    logits = model.text_decoder.logits(h)[:, :-1]  # position t predicts token t + 1
    targets = dec_ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -100
    targets[:, :3] = -100  # "a picture of" (positions 1..3) is the prompt
    want = F.cross_entropy(logits.reshape(-1, 128), targets.reshape(-1), ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # The prompt really is excluded: counting it changes the loss.
    assert not torch.allclose(model(images, ids, mask, prompt_length=1), loss)


def test_generate_strips_the_prompt(model, tok):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids = model.generate_ids(images, num_beams=3, max_length=12, min_length=6)
    assert ids.shape[0] == 3 and ids.shape[1] <= 12
    assert ids[:, :4].tolist() == [[5] + tok("a picture of").input_ids[1:-1]] * 3
    caps = model.generate(images, num_beams=3, max_length=12, min_length=6)
    want = [tok.decode(r, skip_special_tokens=True)[len("a picture of "):] for r in ids.tolist()]
    assert caps == want and all(isinstance(c, str) for c in caps)


def test_sampling_defaults_to_the_originals_repetition_penalty(model):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    a = model.generate_ids(images, sample=True, max_length=14, min_length=5, generator=torch.Generator().manual_seed(0))
    b = model.generate_ids(images, sample=True, max_length=14, min_length=5, repetition_penalty=1.1,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_forward_needs_prompt_length():
    m = BlipForCaptioning(small_config())
    with pytest.raises(ValueError, match="prompt_length"):
        m(torch.randn(1, 3, 32, 32), torch.tensor([[2, 9, 3]]), torch.ones(1, 3, dtype=torch.long))


# -- metrics ----------------------------------------------------------------------------------


def test_identical_captions_score_perfectly():
    refs = {1: ["a large red circle on the left"], 2: ["a small blue square at the bottom and a circle"]}
    out = caption_scores(refs, {k: v[0] for k, v in refs.items()})
    assert out["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert out["CIDEr"] == pytest.approx(10.0, abs=1e-6)  # cosine 1 for every n, times CIDEr-D's 10


def test_bleu_by_hand():
    # candidate vs reference: 1-grams 5/6, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3; equal lengths (no brevity penalty)
    out = caption_scores({0: "the cat is on the mat"}, {0: "the cat sat on the mat"})
    assert out["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)
    assert out["BLEU-2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-6)
    assert out["BLEU-3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert out["BLEU-4"] < 1e-3
    # brevity penalty exp(1 - 6 / 2) for a 2-word candidate whose words all match
    short = caption_scores({0: "the cat sat on the mat"}, {0: "The cat."})
    assert short["BLEU-1"] == pytest.approx(torch.tensor(-2.0).exp().item(), abs=1e-6)


def test_tokenization_ignores_case_and_punctuation():
    assert simple_ptb_tokenize("A Dog, running!") == "a dog running"
    a = caption_scores({0: ["a dog runs on grass"], 1: ["two cats"]}, {0: "A dog runs on grass.", 1: "Two cats!"})
    assert a["BLEU-4"] == pytest.approx(caption_scores({0: "a dog runs on grass", 1: "two cats"},
                                                       {0: "a dog runs on grass", 1: "two cats"})["BLEU-4"])
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({0: "a"}, {1: "a"})


SENTENCES = [
    "A man's dog doesn't run, it can't (really) jump.",
    'Two t-shirts cost $3.50 and/or 1,000 "dollars"... ok; fine: yes-no? Mr. Smith',
    "They're we've I'll she'd I'm o'clock rock 'n' roll",
    "A brown dog   plays with a ball in the park.",
    "Kids at 10:30 on a sunny day!",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="the Java PTB tokenizer needs java")
def test_python_tokenizer_matches_the_java_ptb_tokenizer():
    from blipfast.eval.caption_metrics import tokenize_captions

    ptb = tokenize_captions({i: [s] for i, s in enumerate(SENTENCES)}, "ptb")
    for i, s in enumerate(SENTENCES):
        assert simple_ptb_tokenize(s) == ptb[i][0], s
