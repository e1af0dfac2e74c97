"""Part 23: classification fine-tuning (llm_from_scratch.classify). Tiny models, the real SMS Spam Collection
from LLM_FROM_SCRATCH_DATA (or the cache), so everything runs in seconds."""
import copy
import os

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import SHARED_DATA
from llm_from_scratch.classify import (MergedLinesWarning, SpamDataset, calc_accuracy_loader,
                                       calc_loss_batch_classifier, calc_loss_loader_classifier, classify_review,
                                       create_balanced_dataset, load_sms_spam, random_split, sms_spam_splits,
                                       to_classifier, train_classifier_simple, write_spam_splits)
from llm_from_scratch.download import fetch
from llm_from_scratch.model import GPTModel
from llm_from_scratch.tokenizer import gpt2_tokenizer


@pytest.fixture(scope="module", autouse=True)
def data_env(tmp_path_factory):
    "The mirrored data files, and a cache of our own for the split CSVs."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FROM_SCRATCH_DATA", os.environ.get("LLM_FROM_SCRATCH_DATA") or str(SHARED_DATA))
        mp.setenv("LLM_FROM_SCRATCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield mp


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    with pytest.warns(MergedLinesWarning, match="lines 5082-5084"):
        return sms_spam_splits(folder=tmp_path_factory.mktemp("sms"))


def tiny(context_length=32, emb_dim=16, n_layers=2, seed=0):
    torch.manual_seed(seed)
    return GPTModel({"vocab_size": 50257, "context_length": context_length, "emb_dim": emb_dim, "n_heads": 2,
                     "n_layers": n_layers, "drop_rate": 0.0, "qkv_bias": False})


def write_lines(tmp_path, lines, name="sms.tsv"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


# --- the data, exactly as the book prepares it ---

def test_the_file_reads_as_in_the_book():
    with pytest.warns(MergedLinesWarning, match=r"3 lines became 1 row \(lines 5082-5084\).*5,572 rows from 5,574"):
        df = load_sms_spam()
    assert len(df) == 5572
    assert df["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    assert df.attrs["merged_lines"] == [(5082, 5084)]


def test_the_merge_is_exactly_three_ham_lines():
    "Re-parse the file ourselves: quotes='keep' gives one row per line, and only lines 5082-5084 differ."
    lines = open(fetch("SMSSpamCollection"), encoding="utf-8").read().split("\n")
    lines = [line for line in lines if line]
    keep = load_sms_spam(quotes="keep")
    assert len(keep) == len(lines) == 5574
    assert keep["Label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    assert [f"{a}\t{b}" for a, b in zip(keep["Label"], keep["Text"])] == lines
    with pytest.warns(MergedLinesWarning):
        book = load_sms_spam()
    row = 5081                                                     # 0-based row of file line 5082
    assert book["Text"][row] == "\n".join([lines[5081].split("\t", 1)[1][1:], lines[5082],
                                           lines[5083].replace('\t"', "\t", 1)])
    assert book["Text"].drop(index=row).str.contains("\n").sum() == 0
    assert book["Label"][:row].tolist() == keep["Label"][:row].tolist()
    assert book["Label"][row + 1:].tolist() == keep["Label"][row + 3:].tolist()


def test_balanced_and_split_like_the_book(splits):
    with pytest.warns(MergedLinesWarning):
        balanced = create_balanced_dataset(load_sms_spam())
    assert balanced["Label"].value_counts().to_dict() == {"ham": 747, "spam": 747}
    # the book's own steps, written out with pandas: the same rows in the same order
    df = pd.read_csv(fetch("SMSSpamCollection"), sep="\t", header=None, names=["Label", "Text"])
    spam = df[df["Label"] == "spam"]
    book = pd.concat([df[df["Label"] == "ham"].sample(len(spam), random_state=123), spam])
    pd.testing.assert_frame_equal(balanced, book)
    book["Label"] = book["Label"].map({"ham": 0, "spam": 1})
    book = book.sample(frac=1, random_state=123).reset_index(drop=True)
    train, val, test = (pd.read_csv(splits[k]) for k in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert train["Text"].tolist() == book["Text"][:1045].tolist()
    assert test["Label"].tolist() == book["Label"][1194:].tolist()


def test_random_split_rounds_down_like_the_book():
    df = pd.DataFrame({"Label": [0, 1] * 5, "Text": [f"m{i}" for i in range(10)]})
    a, b, c = random_split(df, 0.75, 0.15)
    assert (len(a), len(b), len(c)) == (7, 1, 2)
    with pytest.raises(ValueError, match="exceeds 1"):
        random_split(df, 0.8, 0.3)


def test_padding_is_to_the_longest_training_message(splits, tokenizer):
    train = SpamDataset(splits["train"], tokenizer)
    longest = max(len(tokenizer.encode(t)) for t in pd.read_csv(splits["train"])["Text"])
    assert train.max_length == longest == 120
    assert all(len(ids) == 120 for ids in train.encoded_texts)
    x, y = train[0]
    assert x.shape == (120,) and x.dtype == torch.long and y.dtype == torch.long
    n_real = len(tokenizer.encode(pd.read_csv(splits["train"])["Text"][0]))
    assert x[n_real:].eq(50256).all()
    val = SpamDataset(splits["validation"], tokenizer, max_length=train.max_length)
    assert all(len(ids) == 120 for ids in val.encoded_texts)


def test_write_spam_splits_is_atomic_and_leaves_no_temporaries(tmp_path):
    df = pd.DataFrame({"Label": [0, 1], "Text": ["a", "b"]})
    paths = write_spam_splits(df, df, df, folder=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv", "train.csv", "validation.csv"]
    assert pd.read_csv(paths["train"]).equals(df)


# --- bad input: clear errors ---

def test_malformed_line_names_the_line(tmp_path):
    p = write_lines(tmp_path, ["ham\tok", "spam\tWIN", "ham no tab here"])
    with pytest.raises(ValueError, match="line 3: no tab"):
        load_sms_spam(p)


def test_missing_message_names_the_line(tmp_path):
    p = write_lines(tmp_path, ["ham\tok", "spam\t   "])
    with pytest.raises(ValueError, match="line 2: the label 'spam' has no message"):
        load_sms_spam(p)


def test_unknown_label_names_the_line(tmp_path):
    p = write_lines(tmp_path, ["ham\tok", "junk\tmaybe"])
    with pytest.raises(ValueError, match="line 2: unknown label 'junk'"):
        load_sms_spam(p)


def test_empty_and_non_string_messages_in_a_csv_are_refused(tmp_path, tokenizer):
    p = tmp_path / "bad.csv"
    pd.DataFrame({"Label": [0, 1], "Text": ["fine", ""]}).to_csv(p, index=None)
    with pytest.raises(ValueError, match="data row 2 has an empty or non-text message"):
        SpamDataset(p, tokenizer)
    pd.DataFrame({"Label": [0, 2], "Text": ["fine", "also fine"]}).to_csv(p, index=None)
    with pytest.raises(ValueError, match="labels must be 0"):
        SpamDataset(p, tokenizer)


def test_max_length_larger_than_the_context_is_refused(splits, tokenizer):
    with pytest.raises(ValueError, match="larger than the model's context of 64"):
        SpamDataset(splits["train"], tokenizer, max_length=65, context_length=64)
    with pytest.raises(ValueError, match="pass max_length=64 to truncate"):
        SpamDataset(splits["train"], tokenizer, context_length=64)
    assert SpamDataset(splits["train"], tokenizer, max_length=64, context_length=64).max_length == 64
    model = to_classifier(tiny(context_length=32))
    with pytest.raises(ValueError, match="larger than the model's context of 32"):
        classify_review("hello", model, tokenizer, "cpu", max_length=33)


def test_classify_review_refuses_empty_and_non_string(tokenizer):
    model = to_classifier(tiny())
    for bad in (None, 3, b"bytes", ["a"]):
        with pytest.raises(TypeError, match="must be a str"):
            classify_review(bad, model, tokenizer, "cpu")
    for bad in ("", "  \n"):
        with pytest.raises(ValueError, match="empty"):
            classify_review(bad, model, tokenizer, "cpu")


def test_a_head_that_is_not_two_way_is_refused(tokenizer):
    lm = tiny()                                                  # still the 50,257-way language-model head
    x, y = torch.randint(0, 50257, (2, 8)), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="not a 2-way"):
        classify_review("hello", lm, tokenizer, "cpu")
    with pytest.raises(ValueError, match="50257 scores per position, not 2"):
        calc_loss_batch_classifier(x, y, lm, "cpu")
    with pytest.raises(ValueError, match="not a 2-way"):
        calc_accuracy_loader([(x, y)], lm, "cpu")
    three = to_classifier(tiny(), num_classes=3)
    with pytest.raises(ValueError, match="not a 2-way"):
        classify_review("hello", three, tokenizer, "cpu")


# --- the model ---

def test_to_classifier_freezes_all_but_last_block_final_norm_and_head():
    model = to_classifier(tiny(n_layers=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("trf_blocks.1.", "final_norm.", "out_head.")) for n in trainable)
    assert {"out_head.weight", "out_head.bias", "final_norm.scale", "final_norm.shift"} <= trainable
    assert model.out_head.weight.shape == (2, 16)
    assert set(model.state_dict()) == set(tiny().state_dict()) | {"out_head.bias"}   # the book's keys
    head_only = to_classifier(tiny(), trainable_blocks=0, train_final_norm=False)
    assert {n for n, p in head_only.named_parameters() if p.requires_grad} == {"out_head.weight", "out_head.bias"}
    assert all(p.requires_grad for p in to_classifier(tiny(), trainable_blocks="all").parameters())
    with pytest.raises(ValueError, match="trainable_blocks"):
        to_classifier(tiny(n_layers=2), trainable_blocks=3)


def test_training_moves_trainable_weights_only_bit_for_bit(splits, tokenizer):
    torch.manual_seed(123)
    model = to_classifier(tiny(context_length=32))
    before = copy.deepcopy(model.state_dict())
    ds = SpamDataset(splits["train"], tokenizer, max_length=32, context_length=32)
    small = torch.utils.data.Subset(ds, range(48))
    train_loader = DataLoader(small, batch_size=8, shuffle=True, drop_last=True)
    val_loader = DataLoader(torch.utils.data.Subset(ds, range(48, 64)), batch_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)     # all params, as the book passes
    tl, vl, ta, va, seen = train_classifier_simple(model, train_loader, val_loader, opt, "cpu", num_epochs=2,
                                                   eval_freq=3, eval_iter=1, verbose=False)
    assert seen == 2 * 48 and len(tl) == len(vl) == 4 and len(ta) == len(va) == 2
    for name, p in model.named_parameters():
        same = torch.equal(p.detach(), before[name])
        assert same != p.requires_grad, f"{name}: requires_grad={p.requires_grad} but unchanged={same}"


def test_loss_and_accuracy_read_the_last_position():
    class Fixed(torch.nn.Module):
        "Class 1 at the last position, class 0 everywhere else."
        def forward(self, x):
            out = torch.zeros(x.shape[0], x.shape[1], 2)
            out[:, :, 0] = 5.0
            out[:, -1] = torch.tensor([0.0, 5.0])
            return out
    x = torch.zeros(4, 6, dtype=torch.long)
    assert calc_accuracy_loader([(x, torch.ones(4, dtype=torch.long))], Fixed(), "cpu") == 1.0
    assert calc_loss_loader_classifier([(x, torch.ones(4, dtype=torch.long))], Fixed(), "cpu") < 0.01


def test_a_message_longer_than_the_context_classifies(tokenizer):
    long_message = "Free entry in a weekly competition! " * 50               # hundreds of tokens
    assert len(tokenizer.encode(long_message)) > 200
    # a model whose embedding width (64) exceeds its context (32): reading the width as the context crashes
    model = to_classifier(tiny(context_length=32, emb_dim=64))
    assert classify_review(long_message, model, tokenizer, "cpu") in ("spam", "not spam")
    assert classify_review(long_message, model, tokenizer, "cpu", max_length=32) in ("spam", "not spam")
    assert classify_review(long_message, to_classifier(tiny(context_length=16)), tokenizer, "cpu") in ("spam", "not spam")


def test_classify_review_truncates_to_the_context_not_the_width(tokenizer):
    "The answer depends only on the first context_length tokens (the rows of pos_emb, not its width)."
    model = to_classifier(tiny(context_length=8, emb_dim=32))
    ids = tokenizer.encode("a b c d e f g h i j k l m n o p q r")
    first8 = tokenizer.decode(ids[:8])
    for tail in (" zzz yyy", " Win cash now call 0800"):
        assert classify_review(first8 + tail, model, tokenizer, "cpu") == classify_review(first8, model, tokenizer, "cpu")


def test_classify_review_hands_back_the_callers_mode(tokenizer):
    model = to_classifier(tiny())
    for training in (True, False):
        model.train(training)
        assert classify_review("Win a prize now", model, tokenizer, "cpu") in ("spam", "not spam")
        assert model.training is training
        assert all(m.training is training for m in model.modules())
    model.train()
    with pytest.raises(ValueError, match="not a 2-way"):
        classify_review("hello", to_classifier(tiny(), num_classes=3).train(), tokenizer, "cpu")
    lm = tiny().train()
    with pytest.raises(ValueError):
        classify_review("hello", lm, tokenizer, "cpu")
    assert lm.training                                           # restored after a refusal too


def test_calc_accuracy_loader_hands_back_the_mode_after_a_refusal():
    model = to_classifier(tiny()).train()
    x = torch.randint(0, 50257, (2, 8))
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape \\(2,\\)"):
        calc_accuracy_loader([(x, torch.tensor([[0], [1]]))], model, "cpu")
    assert model.training


def test_quoted_messages_lose_their_quotes_only_in_the_book_reading(tmp_path):
    p = write_lines(tmp_path, ['ham\t"Hi" she said', "spam\tWIN"])
    assert load_sms_spam(p)["Text"][0] == "Hi she said"
    assert load_sms_spam(p, quotes="keep")["Text"][0] == '"Hi" she said'
    with pytest.raises(ValueError, match="quotes='x' must be one of"):
        load_sms_spam(p, quotes="x")
