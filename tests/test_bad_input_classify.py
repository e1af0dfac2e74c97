"""Part 23 (llm_from_scratch.classify) under bad input: every reader names the file, the line or row, and the fix;
no bare KeyError / EmptyDataError / UnicodeDecodeError / shape error escapes; and no file the user had is changed
(sha256 before and after). Tiny models and tiny files only: seconds on a CPU."""
import hashlib
import os
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import SHARED_DATA
from llm_from_scratch.classify import (MergedLinesWarning, SmsFormatError, SpamDataset, calc_accuracy_loader,
                                       calc_loss_batch_classifier, classify_review, create_balanced_dataset,
                                       load_sms_spam, random_split, to_classifier, write_spam_splits)
from llm_from_scratch.model import GPTModel
from llm_from_scratch.tokenizer import gpt2_tokenizer


@pytest.fixture(scope="module", autouse=True)
def data_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_FROM_SCRATCH_DATA", os.environ.get("LLM_FROM_SCRATCH_DATA") or str(SHARED_DATA))
        yield mp


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def sha(folder: Path) -> dict[str, str]:
    "sha256 of every file under `folder`, by relative path (the user's files, to compare before and after)."
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny():
    torch.manual_seed(0)
    return GPTModel({"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
                     "drop_rate": 0.0, "qkv_bias": False})


GOOD = b"ham\tSee you at 8\nspam\tWIN a prize now!\n"

# (file bytes, exception, words the message must contain: the problem, the place, the fix)
SMS_CASES = {
    "empty file": (b"", SmsFormatError, ["holds no messages", "without a path"]),
    "blank lines only": (b"\n  \n\n", SmsFormatError, ["holds no messages"]),
    "no tab": (GOOD + b"ham See you\n", SmsFormatError, ["line 3", "no tab", "fix or delete that line"]),
    "unknown label": (GOOD + b"Spam\tFree\n", SmsFormatError, ["line 3", "unknown label 'Spam'", "fix or delete"]),
    "empty message": (b"ham\t  \n" + GOOD, SmsFormatError, ["line 1", "has no message", "fix or delete"]),
    "second tab": (GOOD + b"ham\tsee\tyou\n", SmsFormatError, ["line 3", "second tab", "replace the tab"]),
    "a tab alone": (GOOD + b"\t\n", SmsFormatError, ["line 3", "unknown label ''"]),
    "not UTF-8": (GOOD + "ham\tcaf\xe9\n".encode("latin-1"), SmsFormatError,
                  ["line 3", "byte 0xe9 is not UTF-8", "re-save it as UTF-8"]),
    "quote never closed": (b'ham\tfine\nham\t"never closed\nspam\tWIN\n', SmsFormatError,
                           ["line 2", "never closed", "quotes='keep'"]),
    "a CSV split instead": (b"Label,Text\n0,hi\n", SmsFormatError, ["line 1", "no tab"]),
}


@pytest.mark.parametrize("case", sorted(SMS_CASES))
def test_bad_sms_files_name_the_file_the_line_and_the_fix(tmp_path, case):
    data, exc, words = SMS_CASES[case]
    p = tmp_path / "sms.tsv"
    p.write_bytes(data)
    before = sha(tmp_path)
    with pytest.raises(exc) as info:
        load_sms_spam(p)
    message = str(info.value)
    assert isinstance(info.value, ValueError)                   # SmsFormatError is a ValueError
    assert str(p) in message
    for w in words:
        assert w in message, (w, message)
    assert sha(tmp_path) == before


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; check the path"):
        load_sms_spam(tmp_path / "nope.tsv")
    with pytest.raises(IsADirectoryError, match="is a folder; pass the SMS file itself"):
        load_sms_spam(tmp_path)
    with pytest.raises(ValueError, match="quotes='none' must be one of"):
        load_sms_spam(tmp_path, quotes="none")


def test_a_quote_that_spans_lines_is_counted_and_reported_never_silent(tmp_path):
    "The issue's case: four valid lines, one stray quote. The book's reading joins them, and says so."
    p = tmp_path / "sms.tsv"
    p.write_bytes(b'ham\t"Hi there\nham\tsecond\nspam\tthird\nham\tfourth"\nspam\tfifth\n')
    before = sha(tmp_path)
    with pytest.warns(MergedLinesWarning) as caught:
        df = load_sms_spam(p)
    assert len(caught) == 1
    message = str(caught[0].message)
    for w in (str(p), "4 lines became 1 row", "lines 1-4", "2 rows from 5 non-blank lines", "quotes='keep'"):
        assert w in message, (w, message)
    assert df.attrs["merged_lines"] == [(1, 4)] and len(df) == 2
    keep = load_sms_spam(p, quotes="keep")                      # one message per line: nothing joined, no warning
    assert len(keep) == 5 and keep.attrs["merged_lines"] == [] and keep["Text"][0] == '"Hi there'
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergedLinesWarning)
        load_sms_spam(p, quotes="keep")
        with pytest.raises(MergedLinesWarning):                 # a caller can make the join an error
            load_sms_spam(p)
    assert sha(tmp_path) == before


def test_line_numbers_count_blank_lines_and_carriage_returns(tmp_path):
    p = tmp_path / "sms.tsv"
    p.write_bytes(b"ham\tone\r\n\r\nspam\ttwo\rham\t\"three\nham\tfour\"\n")
    with pytest.warns(MergedLinesWarning, match="lines 4-5"):
        df = load_sms_spam(p)
    assert df["Text"].tolist() == ["one", "two", "three\nham\tfour"]
    p.write_bytes(b"\xef\xbb\xbfham\tone\n\nham no tab\n")      # a BOM is not part of the first label
    with pytest.raises(SmsFormatError, match="line 3: no tab"):
        load_sms_spam(p)


def test_messages_that_pandas_would_read_as_missing_stay_text(tmp_path, tokenizer):
    p = tmp_path / "sms.tsv"
    p.write_bytes(b"ham\tNone\nspam\tNA\nham\tnull\n")
    assert load_sms_spam(p)["Text"].tolist() == ["None", "NA", "null"]
    csv = tmp_path / "split.csv"
    pd.DataFrame({"Label": [0, 1], "Text": ["None", "free <|endoftext|> prize"]}).to_csv(csv, index=None)
    ds = SpamDataset(csv, tokenizer)
    assert ds.data["Text"].tolist() == ["None", "free <|endoftext|> prize"]
    assert 50256 not in tokenizer.encode("free <|endoftext|> prize", disallowed_special=())
    assert ds.encoded_texts[1][: len(tokenizer.encode("free <|endoftext|> prize", disallowed_special=()))] == \
        tokenizer.encode("free <|endoftext|> prize", disallowed_special=())


CSV_CASES = {
    "missing": (None, FileNotFoundError, ["does not exist", "write_spam_splits"]),
    "empty file": (b"", ValueError, ["is empty", "write_spam_splits"]),
    "header only": (b"Label,Text\n", ValueError, ["holds no messages", "write_spam_splits"]),
    "not UTF-8": ("Label,Text\n0,caf\xe9\n".encode("latin-1"), ValueError, ["not UTF-8", "re-save it as UTF-8"]),
    "wrong columns": (b"label,message\n0,hi\n", ValueError, ["expected 'Label' and 'Text'"]),
    "text labels": (b"Label,Text\nham,hi\n", ValueError, ["data row 1", "label 'ham'", ".map("]),
    "empty message": (b"Label,Text\n0,hi\n1,\n", ValueError, ["data row 2", "empty or non-text message"]),
    "missing label": (b"Label,Text\n,hi\n", ValueError, ["data row 1", "labels must be 0"]),
    "ragged rows": (b"Label,Text\n0,hi\n1,a,b,c\n", ValueError, ["not a 'Label,Text' CSV"]),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_bad_split_csvs_name_the_file_and_the_fix(tmp_path, tokenizer, case):
    data, exc, words = CSV_CASES[case]
    p = tmp_path / "train.csv"
    if data is not None:
        p.write_bytes(data)
    before = sha(tmp_path)
    with pytest.raises(exc) as info:
        SpamDataset(p, tokenizer)
    message = str(info.value)
    assert str(p) in message
    for w in words:
        assert w in message, (w, message)
    assert sha(tmp_path) == before


def test_a_folder_instead_of_a_csv(tmp_path, tokenizer):
    with pytest.raises(IsADirectoryError, match="is a folder; pass one of its CSV files"):
        SpamDataset(tmp_path, tokenizer)


def test_frames_that_cannot_be_balanced_or_split():
    mapped = pd.DataFrame({"Label": [0, 1], "Text": ["a", "b"]})
    with pytest.raises(ValueError, match="labels 0, 1 are not among .* Balance before mapping"):
        create_balanced_dataset(mapped)
    with pytest.raises(ValueError, match="at least one spam row"):
        create_balanced_dataset(pd.DataFrame({"Label": ["ham"], "Text": ["a"]}))
    with pytest.raises(ValueError, match="has no rows; load the messages first"):
        create_balanced_dataset(mapped[:0])
    with pytest.raises(ValueError, match="got list; pass the balanced messages"):
        random_split([1, 2, 3], 0.7, 0.1)
    with pytest.raises(ValueError, match="got an empty DataFrame"):
        random_split(mapped[:0], 0.7, 0.1)


def _splits():
    df = pd.DataFrame({"Label": [0, 1], "Text": ["see you", "win"]})
    return df, df, df


def test_writing_into_a_file_names_the_target_and_changes_nothing(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("the user's notes\n")
    before = sha(tmp_path)
    with pytest.raises(NotADirectoryError) as info:
        write_spam_splits(*_splits(), folder=blocker)
    assert f"cannot write {blocker / 'train.csv'}" in str(info.value) and "is a file, not a folder" in str(info.value)
    with pytest.raises(OSError) as info:                        # a folder below a file cannot be created either
        write_spam_splits(*_splits(), folder=blocker / "sub")
    assert f"cannot write {blocker / 'sub' / 'train.csv'}" in str(info.value) and "pass folder=" in str(info.value)
    assert sha(tmp_path) == before


def test_a_failed_write_replaces_none_of_the_three_files(tmp_path):
    "validation.csv is a folder: the write fails, names it, and train.csv and test.csv keep their old bytes."
    paths = write_spam_splits(*_splits(), folder=tmp_path)
    paths["validation"].unlink()
    paths["validation"].mkdir()
    (paths["validation"] / "keep.txt").write_text("mine")
    before = sha(tmp_path)
    new = pd.DataFrame({"Label": [1], "Text": ["other"]})
    with pytest.raises(IsADirectoryError) as info:
        write_spam_splits(new, new, new, folder=tmp_path)
    assert f"cannot write {paths['validation']}" in str(info.value) and "No file is left half-written" in str(info.value)
    assert sha(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv", "train.csv", "validation.csv"]   # no temporaries


def test_non_frames_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="the validation split must be a DataFrame"):
        write_spam_splits(_splits()[0], [1, 2], _splits()[0], folder=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels, words", [
    (torch.tensor([[0], [1]]), "shape (2,), one class per message, got (2, 1)"),
    (torch.tensor([0, 1, 1]), "shape (2,), one class per message, got (3,)"),
    (torch.tensor([0.0, 1.0]), "must be an integer tensor"),
    (torch.tensor([0, 2]), "labels run from 0 to 2, but a 2-way classifier needs 0 to 1"),
    (torch.tensor([-1, 0]), "labels run from -1 to 0"),
])
def test_labels_of_the_wrong_shape_or_range_are_refused(labels, words):
    "Before: a (B, 1) label batch broadcast to (B, B) and gave a silently wrong accuracy; others were bare torch errors."
    model = to_classifier(tiny())
    x = torch.randint(0, 50257, (2, 8))
    with pytest.raises(ValueError) as info:
        calc_loss_batch_classifier(x, labels, model, "cpu")
    assert words in str(info.value) and "calc_loss_batch_classifier" in str(info.value)
    with pytest.raises(ValueError) as info:
        calc_accuracy_loader([(x, labels)], model, "cpu")
    assert words in str(info.value) and "calc_accuracy_loader" in str(info.value)


def test_token_batches_the_model_cannot_take_are_refused_with_a_fix():
    model = to_classifier(tiny())
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="add a batch dimension"):
        calc_loss_batch_classifier(torch.randint(0, 50257, (8,)), y[:1], model, "cpu")
    with pytest.raises(ValueError, match="crop it to the last 16 tokens"):
        calc_loss_batch_classifier(torch.randint(0, 50257, (2, 20)), y, model, "cpu")
    with pytest.raises(ValueError, match="check that the tokenizer matches"):
        calc_accuracy_loader([(torch.full((2, 4), 60000), y)], model, "cpu")


def test_classify_review_refuses_what_is_not_a_classifier(tokenizer):
    with pytest.raises(TypeError, match="expected a GPTModel made into a classifier"):
        classify_review("hello", torch.nn.Linear(2, 2), tokenizer, "cpu")
    assert classify_review("free <|endoftext|> prize", to_classifier(tiny()), tokenizer, "cpu") in ("spam", "not spam")
