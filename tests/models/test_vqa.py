"""VQA model (answer-weighted loss, answer-list ranking against a naive loop, generation) and the
VQA accuracy metric with the official answer normalisation."""
import pytest
import torch
import torch.nn.functional as F

from blipfast.config import BlipConfig, TextConfig, VisionConfig
from blipfast.eval.vqa_metrics import normalize_answer, vqa_accuracy, vqa_score
from blipfast.models.vqa import BlipForVQA
from tests.helpers import sharpen_

V = 30


def small_config():
    return BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=16, width=24, depth=2, num_heads=2),
        text=TextConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, cls_token_id=2, sep_token_id=3,
                        dec_token_id=5, enc_token_id=6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        embed_dim=16, queue_size=16, attention_backend="reference", loss_backend="reference",
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = BlipForVQA(small_config())
    sharpen_(m, 1)
    return m.eval()


def texts(lengths, seed):
    """[CLS] w.. [SEP] pad.. rows."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, 0], ids[r, n - 1] = 2, 3
        ids[r, 1:n - 1] = torch.randint(7, V, (n - 2,), generator=g)
        mask[r, :n] = 1
    return ids, mask


def answer_nll_naive(model, states, qmask, ids, mask):
    """Summed label-smoothed CE of one answer, decoder run on the full question states."""
    dec = ids.clone()
    dec[:, 0] = 5
    h = model.text_decoder(dec, mask, image_embeds=states, image_mask=qmask.bool())
    logits = model.text_decoder.logits(h)[:, :-1]
    tgt = dec[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), ignore_index=-100, label_smoothing=0.1,
                           reduction="sum")


def test_decoder_reads_question_width(model):
    sd = model.state_dict()
    assert sd["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 32)
    assert sd["text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 24)


def test_weighted_loss_matches_per_answer_sum(model):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q, qm = texts([5, 3], seed=1)
    a, am = texts([3, 4, 3], seed=2)
    n, w = torch.tensor([1, 2]), torch.tensor([1.0, 0.6, 0.2])
    loss = model(images, q, qm, a, am, n, w)
    with torch.no_grad():
        states = model.encode_question(images, q, qm)
    rows = [0, 1, 1]
    want = sum(w[i] * answer_nll_naive(model, states[rows[i]][None], qm[rows[i]][None], a[i:i + 1], am[i:i + 1])
               for i in range(3)) / 2
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="answers expected"):
        model(images, q, qm, a[:2], am[:2], n, w[:2])


def rank_naive(model, images, q, qm, a, am, k):
    """The original's rank_answer, one question and one answer at a time."""
    out = []
    with torch.no_grad():
        states = model.encode_question(images, q, qm)
        for b in range(images.shape[0]):
            s, m = states[b:b + 1], qm[b:b + 1]
            h = model.text_decoder(torch.tensor([[5]]), None, image_embeds=s, image_mask=m.bool())
            p = model.text_decoder.logits(h)[0, 0].softmax(-1)
            first = torch.tensor([p[a[i, 1]] for i in range(a.shape[0])])
            cand = first.topk(k).indices
            scores = torch.stack([-answer_nll_naive(model, s, m, a[i:i + 1], am[i:i + 1]) for i in cand])
            out.append(int(cand[scores.argmax()]))
    return out


@pytest.mark.parametrize("k", [3, 7])
def test_rank_answers_matches_naive_loop(model, k):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    q, qm = texts([6, 4, 5], seed=6)
    a, am = texts([3, 4, 3, 5, 3, 4, 3], seed=7)
    got = model.rank_answers(images, q, qm, a, am, k=k).tolist()
    assert got == rank_naive(model, images, q, qm, a, am, k)


def test_generate_starts_with_dec_and_respects_lengths(model):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    q, qm = texts([6, 4], seed=9)
    ids = model.generate_ids(images, q, qm)
    assert (ids[:, 0] == 5).all() and ids.shape[1] <= 10


# -- metric -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("the dog.", "dog"), ("Yes!", "yes"), ("dont", "don't"), ("1,000", "1000"),
    ("3.5", "3.5"), ("x-ray", "x ray"), ("  red  ball\n", "red ball"), ("none", "0"), ("an apple", "apple"),
    ("left, right", "left right"), ("isnt it", "isn't it"),
])
def test_answer_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("matches,acc", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_accuracy_is_leave_one_out_min_over_three(matches, acc):
    answers = ["2"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("two", answers) == pytest.approx(acc)


def test_ground_truth_punctuation_only_when_answers_differ():
    assert vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)  # gts processed
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0  # all identical: used as they are (official rule)
    out = vqa_score({1: "yes", 2: "2"}, {1: ["yes"] * 10, 2: ["3"] * 10})
    assert out == {"overall": 50.0, "num_questions": 2.0}
