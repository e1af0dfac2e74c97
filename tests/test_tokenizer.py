"""Tests for llm_from_scratch.tokenizer (part 2): bad input, offline GPT-2 ids, from-scratch BPE == tiktoken.

Needs the course data files offline: set LLM_FROM_SCRATCH_DATA to a folder holding encoder.json, vocab.bpe
and the-verdict.txt (CI does). No network is used.
"""
import pytest
import torch

from llm_from_scratch.download import read_text
from llm_from_scratch.tokenizer import (
    GPT2BPE, GPT2_ENDOFTEXT_ID, GPT2_SPLIT_PATTERN, SimpleTokenizerV1, SimpleTokenizerV2, UnknownTokenError,
    build_vocab, bytes_to_unicode, gpt2_tokenizer, split_text,
)


@pytest.fixture(scope="module")
def verdict():
    return read_text("the-verdict.txt")


@pytest.fixture(scope="module")
def verdict_vocab(verdict):
    return build_vocab(verdict)


@pytest.fixture(scope="module")
def bpe():
    return GPT2BPE.from_registry()


@pytest.fixture(scope="module")
def tik():
    return gpt2_tokenizer()


# --- word-level tokenizers -------------------------------------------------------------------------------

def test_split_text_keeps_punctuation_drops_whitespace():
    assert split_text('Hello, world--"yes"?\n') == ["Hello", ",", "world", "--", '"', "yes", '"', "?"]
    with pytest.raises(TypeError, match="expects a str"):
        split_text(b"bytes")


def test_build_vocab_sizes_and_special_ids(verdict):
    assert len(build_vocab(verdict, special_tokens=())) == 1130
    vocab = build_vocab(verdict)
    assert len(vocab) == 1132 and vocab["<|endoftext|>"] == 1130 and vocab["<|unk|>"] == 1131
    assert sorted(vocab.values()) == list(range(1132))
    # a special token repeated, or already present in the text, is added once: ids stay contiguous
    v = build_vocab("a b <|unk|>", special_tokens=("<|unk|>", "<|endoftext|>", "<|endoftext|>"))
    assert sorted(v.values()) == list(range(len(v))) and len(v) == 4
    with pytest.raises(TypeError, match="not a str"):
        build_vocab("a b", special_tokens="<|unk|>")


def test_v1_book_ids_and_unknown_word_error(verdict):
    tok = SimpleTokenizerV1(build_vocab(verdict, special_tokens=()))
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    assert tok.encode(text) == [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793, 7]
    with pytest.raises(UnknownTokenError, match=r"'Hello' is not in the vocabulary.*SimpleTokenizerV2") as info:
        tok.encode("Hello, do you like tea?")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyError):          # code written against the book's bare dict lookup still works
        tok.encode("Hello")


def test_v1_decode_unknown_id_and_bad_vocab(verdict_vocab):
    tok = SimpleTokenizerV1(verdict_vocab)
    with pytest.raises(UnknownTokenError, match="token id 5000 is not in the vocabulary"):
        tok.decode([1, 5000])
    with pytest.raises(TypeError, match="non-empty dict"):
        SimpleTokenizerV1(["a", "b"])
    with pytest.raises(TypeError, match="str -> int"):
        SimpleTokenizerV1({"a": "0"})
    with pytest.raises(ValueError, match="same id"):
        SimpleTokenizerV1({"a": 0, "b": 0})


def test_v2_maps_unknown_words_and_book_ids(verdict_vocab):
    tok = SimpleTokenizerV2(verdict_vocab)
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    ids = tok.encode(text)
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tok.decode(ids) == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."


def test_v2_without_unk_in_vocab_is_an_error(verdict):
    with pytest.raises(ValueError, match=r"needs a '<\|unk\|>' entry"):
        SimpleTokenizerV2(build_vocab(verdict, special_tokens=("<|endoftext|>",)))


# --- GPT-2 via tiktoken, offline ---------------------------------------------------------------------------

def test_gpt2_tokenizer_offline_acceptance_ids(tik):
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = tik.encode(text, allowed_special={"<|endoftext|>"})
    assert ids[:9] == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256]
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286,
                   617, 34680, 27271, 13]
    assert tik.decode(ids) == text
    assert tik.n_vocab == 50257 and tik.eot_token == GPT2_ENDOFTEXT_ID
    assert gpt2_tokenizer() is tik                      # lru_cache: built once


def test_gpt2_tokenizer_refuses_special_token_in_text(tik):
    with pytest.raises(ValueError, match="disallowed special token"):
        tik.encode("tea <|endoftext|>")


# --- from-scratch BPE ---------------------------------------------------------------------------------------

def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


TRICKY = [
    "", " ", "\n", "   leading and trailing   ", "tabs\t\tand\r\nwindows\n\n\nnewlines",
    "I'm, you're, they've, we'll, she'd, it's; IT'S, I'M, O'Neil's 'quoted'",
    "3.14159 and 1,000,000 and 2024-11-24 and 12345678901234567890",
    "naïve café déjà vu", "Здравствуй, мир", "東京は晴れ。", "مرحبا بالعالم", "🦙🙂👩‍👩‍👧 emoji!",
    "a\u00a0non-breaking\u2009thin\u3000ideographic space", "zero\u200bwidth", "don't   stop  --  believing!!!",
    "x" * 300, " ".join(["supercalifragilisticexpialidocious"] * 3), "\x00\x01 control \x7f bytes",
    "def f(x):\n    return x ** 2  # code\n",
]


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_matches_tiktoken_on_tricky_strings(bpe, tik, text):
    assert bpe.encode(text) == tik.encode(text)
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.decode_bytes(bpe.encode(text)) == text.encode("utf-8")


def test_bpe_matches_tiktoken_on_the_verdict(bpe, tik, verdict):
    ids = bpe.encode(verdict)
    assert len(ids) == 5145 and ids == tik.encode(verdict)
    assert bpe.decode(ids) == verdict


def test_bpe_matches_tiktoken_on_all_of_tiny_shakespeare(bpe, tik):
    text = read_text("tinyshakespeare.txt")                       # about 1.1M characters, 338k tokens
    ids = bpe.encode(text)
    assert len(ids) == 338_025 and ids == tik.encode(text)
    assert bpe.decode(ids) == text


def test_bpe_special_tokens_follow_tiktoken(bpe, tik):
    text = "a <|endoftext|> b<|endoftext|>"
    assert bpe.encode(text, allowed_special={"<|endoftext|>"}) == tik.encode(text, allowed_special={"<|endoftext|>"})
    assert bpe.encode(text, allowed_special="all") == tik.encode(text, allowed_special="all")
    assert bpe.encode(text, disallowed_special=()) == tik.encode(text, disallowed_special=())
    assert bpe.decode(bpe.encode(text, allowed_special="all")) == text
    with pytest.raises(ValueError, match=r"allowed_special=\{'<\|endoftext\|>'\}"):
        bpe.encode(text)
    with pytest.raises(ValueError, match="not special tokens"):
        bpe.encode("x", allowed_special={"<|im_start|>"})


def test_bpe_decode_bad_ids(bpe):
    with pytest.raises(UnknownTokenError, match="token id 50257 is outside the vocabulary"):
        bpe.decode([464, 50257])
    with pytest.raises(UnknownTokenError, match="outside the vocabulary"):
        bpe.decode([-1])
    with pytest.raises(TypeError, match="must be integers"):
        bpe.decode([1.0])
    with pytest.raises(TypeError, match="encode expects a str"):
        bpe.encode(b"bytes")
    # tensors of ids (what a model produces) decode like lists
    assert bpe.decode(torch.tensor([15496, 11])) == "Hello,"


def test_bpe_pieces_and_merge_steps(bpe):
    assert [bpe.decode([i]) for i in bpe.encode("someunknownPlace")] == ["some", "unknown", "Place"]
    steps = bpe.merge_steps(" tokenization")
    assert steps[0][0] is None and "".join(steps[0][1]) == "Ġtokenization"
    assert steps[-1][1] == ["Ġtoken", "ization"]
    ranks = [bpe.bpe_ranks[pair] for pair, _ in steps[1:]]
    assert ranks == sorted(ranks)      # for one word, merges happen in order of rank


def test_split_pattern_agrees_with_tiktoken(tik, verdict):
    import regex
    text = verdict + " ".join(TRICKY)
    assert regex.findall(GPT2_SPLIT_PATTERN, text) == regex.findall(tik._pat_str, text)


def test_from_files_rejects_malformed_merges(tmp_path):
    enc = tmp_path / "encoder.json"
    enc.write_text('{"a": 0, "b": 1, "ab": 2}', encoding="utf-8")
    bad = tmp_path / "vocab.bpe"
    bad.write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected two symbols"):
        GPT2BPE.from_files(enc, bad)
    good = tmp_path / "ok.bpe"
    good.write_text("#version: 0.2\nx y\n", encoding="utf-8")
    with pytest.raises(ValueError, match="do not belong together"):
        GPT2BPE.from_files(enc, good)


def test_bpe_special_arguments_must_be_sets(bpe):
    with pytest.raises(TypeError, match="not a bare str"):
        bpe.encode("x", allowed_special="<|endoftext|>")
    with pytest.raises(TypeError, match="not a bare str"):
        bpe.encode("x", disallowed_special="<|endoftext|>")
