"""Caption cleaning (hand-computed against the original rules) and the BLIP tokenizers."""
import pytest
import torch

from blipfast.data import (
    DEMO_WORDS, build_demo_tokenizer, load_tokenizer, pre_caption, pre_question, tokenize,
)


@pytest.mark.parametrize(
    "text, max_words, expected",
    [
        ("A Dog (running) on the beach!!", 50, "a dog running on the beach"),
        ("It's 5 o'clock: time~to*go.", 50, "it's 5 o'clock time to go"),
        ("#tag;x", 50, "tag x"),
        ('He said "hi"', 50, "he said hi"),
        ("two\n\nlines\n", 50, "two lines"),  # a whitespace run becomes one space, then '\n' is stripped
        ("hello\tworld", 50, "hello\tworld"),  # a single tab is not a run: kept, as in the original
        ("  padded   words  ", 50, "padded words"),
        (" ".join(str(i) for i in range(40)), 30, " ".join(str(i) for i in range(30))),
        ("one two three", 3, "one two three"),
        ("one two three four", 3, "one two three"),
        ("...", 50, ""),
    ],
)
def test_pre_caption(text, max_words, expected):
    assert pre_caption(text, max_words) == expected


@pytest.mark.parametrize(
    "text, max_words, expected",
    [
        ("What is the Man holding?", 50, "what is the man holding?"),  # '?' is not in the set
        ('Is it "red"; or (blue)?  ', 50, "is it red or blue?"),  # deleted, trailing spaces stripped
        ("a.b", 50, "ab"),  # deleted, where pre_caption puts a space
        ("  hi", 50, "  hi"),  # leading spaces and inner runs are kept
        ("a  b c", 2, "a "),  # truncation counts the empty piece between two spaces
    ],
)
def test_pre_question(text, max_words, expected):
    assert pre_question(text, max_words) == expected


def test_pre_caption_rejects_non_strings():
    with pytest.raises(TypeError, match="string"):
        pre_caption(["a list"])


def test_demo_tokenizer_ids_and_words(tmp_path):
    tok = build_demo_tokenizer(str(tmp_path))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    assert tok.convert_tokens_to_ids(specials) == list(range(7))
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 2, 3)
    assert (tok.dec_token_id, tok.bos_token_id, tok.enc_token_id) == (5, 5, 6)
    assert len(tok) == 128
    with open(tmp_path / "vocab.txt") as f:
        assert f.read().split("\n")[:8] == specials + [DEMO_WORDS[0]]
    # Every demo word (captions, the "a picture of" prompt, question words) is one known token.
    for w in DEMO_WORDS:
        assert tok.tokenize(w) == [w], w
    ids = tok.convert_tokens_to_ids(list(DEMO_WORDS))
    assert tok.unk_token_id not in ids


def test_tiny_config_matches_demo_tokenizer(tiny_config):
    tok = build_demo_tokenizer()
    t = tiny_config.text
    assert t.vocab_size == len(tok)
    assert (t.pad_token_id, t.cls_token_id, t.sep_token_id) == (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id)
    assert (t.dec_token_id, t.enc_token_id) == (tok.dec_token_id, tok.enc_token_id)


def _bert_like_vocab(path):
    """30,522 entries laid out like bert-base-uncased: [PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103."""
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["a", "dog", "on", "the", "beach", "run", "##ning"]
    words += [f"w{i}" for i in range(30522 - len(words))]
    path.write_text("\n".join(words) + "\n")
    return words


def test_load_tokenizer_bert_layout(tmp_path):
    vocab = tmp_path / "bert" / "vocab.txt"
    vocab.parent.mkdir()
    words = _bert_like_vocab(vocab)
    for source in (str(vocab), str(vocab.parent)):  # a file, or a directory holding vocab.txt
        tok = load_tokenizer(source)
        assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) == (101, 102, 0)
        assert (tok.dec_token_id, tok.enc_token_id, len(tok)) == (30522, 30523, 30524)
        ids, mask = tokenize(tok, ["A dog running on the beach"], 12)
        expected = [101] + [words.index(w) for w in ["a", "dog", "run", "##ning", "on", "the", "beach"]] + [102]
        assert ids[0].tolist() == expected + [0] * 3
        assert mask[0].tolist() == [1] * 9 + [0] * 3


def test_tokenize_pads_truncates_and_keeps_sep():
    tok = build_demo_tokenizer()
    caps = ["a red circle on the left", " ".join(["red"] * 40)]
    ids, mask = tokenize(tok, caps, 10)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (2, 10)
    red = tok.convert_tokens_to_ids("red")
    assert ids[0].tolist() == [2] + tok.convert_tokens_to_ids("a red circle on the left".split()) + [3, 0, 0]
    assert ids[1].tolist() == [2] + [red] * 8 + [3]  # truncated, [SEP] still last
    assert mask.sum(1).tolist() == [8, 10]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_tokenizer(str(tmp_path))  # an empty directory
    with pytest.raises(TypeError, match="list"):
        tokenize(build_demo_tokenizer(), "a single string", 8)
