"""Bad input for part 25 (llm_from_scratch.instruct): instruction data files, responses files, failed writes and
stale answers. Every case asserts that the message names the problem, the file (and the entry, where there is
one) and the fix, and that no file the user had was changed (sha256 before and after)."""
import hashlib
import json
import os
import types

import pytest
import torch

from llm_from_scratch import instruct
from llm_from_scratch.download import read_text
from llm_from_scratch.instruct import (InstructionDataError, ResponsesFileError, ResponsesWriteError,
                                       check_instruction_data, format_input, load_instruction_data, load_responses,
                                       save_responses, stale_reason)
from llm_from_scratch.model import GPTModel

TINY = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.0, "qkv_bias": False}
DATA_MIRROR = os.environ.get("LLM_FROM_SCRATCH_DATA")
GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
ANSWER = {**GOOD, "model_response": "Red.", "model_name": "tiny, instruction-tuned in part 25"}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha_tree(folder):
    return {p.name: sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


# ---- instruction data files ------------------------------------------------------------------------------
JSON_LIST_FIX = "JSON list of dicts"
DATA_CASES = {                      # file bytes -> what the message must contain (besides the file's name)
    "empty file": (b"", ["is empty", JSON_LIST_FIX]),
    "only whitespace": (b"  \n\n ", ["is empty", JSON_LIST_FIX]),
    "not UTF-8": ('[{"instruction": "caf\u00e9"}]'.encode("latin-1"), ["not UTF-8", "byte 21", "save it as UTF-8"]),
    "cut off": (b'[{"instruction": "Say hi.", "input": "", "out', ["not valid JSON", "line 1", JSON_LIST_FIX]),
    "not JSON at all": (b"instruction,input,output\nSay hi.,,Hi.\n", ["not valid JSON", JSON_LIST_FIX]),
    "a dict, not a list": (json.dumps(GOOD).encode(), ["must be a list", "got dict", "one JSON list"]),
    "an empty list": (b"[]", ["is empty", "nothing to train"]),
    "an entry that is a string": (json.dumps([GOOD, "Say hi."]).encode(), ["example 1 of", "not a dict"]),
    "instruction is null": (json.dumps([GOOD, {**GOOD, "instruction": None}]).encode(),
                            ["example 1 of", "'instruction' is null (None), not a string", "or drop the example"]),
    "instruction is a number": (json.dumps([{**GOOD, "instruction": 7}]).encode(),
                                ["example 0 of", "'instruction' is an int", "write the instruction as text"]),
    "output is null": (json.dumps([GOOD, GOOD, {**GOOD, "output": None}]).encode(),
                       ["example 2 of", "'output' is null", "or drop the example"]),
    "instruction is empty": (json.dumps([{**GOOD, "instruction": "   "}]).encode(),
                             ["example 0 of", "'instruction' is empty", "write the instruction"]),
    "no output key": (json.dumps([{"instruction": "Say hi.", "input": ""}]).encode(),
                      ["example 0 of", "has no 'output'", "add it, or drop the example"]),
    "input is a list": (json.dumps([{**GOOD, "input": ["a", "b"]}]).encode(),
                        ["example 0 of", "'input' is a list", "an empty string when there is none"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_instruction_data_file(tmp_path, case):
    raw, expected = DATA_CASES[case]
    path = tmp_path / "my-examples.json"
    path.write_bytes(raw)
    before = sha_tree(tmp_path)
    with pytest.raises(InstructionDataError) as err:
        load_instruction_data(path)
    message = str(err.value)
    assert str(path) in message, message
    for part in expected:
        assert part in message, (part, message)
    assert sha_tree(tmp_path) == before                              # nothing written, nothing changed


def test_instruction_data_file_that_is_missing_or_a_folder(tmp_path):
    with pytest.raises(InstructionDataError, match="does not exist.*JSON list of dicts"):
        load_instruction_data(tmp_path / "missing.json")
    with pytest.raises(InstructionDataError, match="is a folder, not a file"):
        load_instruction_data(tmp_path)
    with pytest.raises(InstructionDataError, match="neither a file nor a data file of the course's registry"):
        load_instruction_data("instruction-data")                     # a typo of the registry's name
    assert list(tmp_path.iterdir()) == []


def test_own_good_file_and_the_registry_file_load(tmp_path):
    path = tmp_path / "mine.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD, {**GOOD, "input": None}]).encode())   # a BOM is fine
    assert load_instruction_data(path) == [GOOD, {**GOOD, "input": None}]
    assert load_instruction_data(str(path))[0] == GOOD
    assert len(load_instruction_data()) == 1100 == len(json.loads(read_text("instruction-data.json")))


def test_none_never_formats_as_the_word_none():
    with pytest.raises(InstructionDataError, match="'instruction' is null"):
        format_input({"instruction": None, "input": ""})
    with pytest.raises(InstructionDataError, match="'input' is an int"):
        format_input({"instruction": "Add.", "input": 3})
    assert "None" not in format_input({"instruction": "Add.", "input": None})      # no input: no Input section
    assert "### Input:" not in format_input({"instruction": "Add.", "input": None})


def test_prompts_to_answer_need_no_output():
    entries = [{"instruction": "Say hi.", "input": ""}]
    assert check_instruction_data(entries, need_output=False) == entries
    with pytest.raises(InstructionDataError, match="has no 'output'"):
        check_instruction_data(entries)
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    from llm_from_scratch.tokenizer import gpt2_tokenizer
    (text, stopped), = instruct.generate_responses(model, gpt2_tokenizer(), entries, 2)
    assert isinstance(text, str) and isinstance(stopped, bool)


# ---- responses files --------------------------------------------------------------------------------------
REMAKE_FIX = "run part 25 again"
RESPONSE_CASES = {
    "empty file": (b"", ["is empty"]),
    "not UTF-8": (b'[{"instruction": "\xff"}]', ["not UTF-8", "byte 18"]),
    "cut off": (b'[{"instruction": ', ["not valid JSON", "line 1, column 18"]),
    "a dict": (json.dumps({"answers": [ANSWER]}).encode(), ["expected a non-empty JSON list", "got a dict"]),
    "an empty list": (b"[]", ["got an empty list"]),
    "an entry that is a number": (json.dumps([ANSWER, 5]).encode(), ["entry 1 is an int", "not a dict"]),
    "model_response is null": (json.dumps([ANSWER, {**ANSWER, "model_response": None}]).encode(),
                               ["entry 1 has no string 'model_response'", "null (None)"]),
    "no model_name": (json.dumps([{k: v for k, v in ANSWER.items() if k != "model_name"}]).encode(),
                      ["entry 0 has no string 'model_name'", "the key is missing"]),
    "empty instruction": (json.dumps([ANSWER, ANSWER, {**ANSWER, "instruction": ""}]).encode(),
                          ["entry 2 has an empty 'instruction'"]),
}


@pytest.mark.parametrize("case", sorted(RESPONSE_CASES))
def test_bad_responses_file(tmp_path, case):
    raw, expected = RESPONSE_CASES[case]
    path = tmp_path / "answers.json"
    path.write_bytes(raw)
    before = sha_tree(tmp_path)
    with pytest.raises(ResponsesFileError) as err:
        load_responses(path)
    message = str(err.value)
    assert str(path) in message and REMAKE_FIX in message, message
    for part in expected:
        assert part in message, (part, message)
    assert sha_tree(tmp_path) == before


def test_responses_file_missing_or_a_folder(tmp_path):
    with pytest.raises(ResponsesFileError, match="does not exist; run part 25"):
        load_responses(tmp_path / "missing.json")
    with pytest.raises(ResponsesFileError, match="is a folder, not a file"):
        load_responses(tmp_path)


def test_saving_bad_entries_writes_nothing(tmp_path):
    path = save_responses([ANSWER], tmp_path / "answers.json")
    before = sha_tree(tmp_path)
    for bad, expected in (([], "empty list"), ([{**ANSWER, "model_response": None}], "'model_response'"),
                          ([ANSWER, "oops"], "entry 1"), ({"a": ANSWER}, "got a dict")):
        with pytest.raises(ResponsesFileError, match=expected):
            save_responses(bad, path)
    assert sha_tree(tmp_path) == before


# ---- writes that cannot happen ----------------------------------------------------------------------------
def test_write_to_a_folder_names_the_folder(tmp_path):
    folder = tmp_path / "answers.json"
    folder.mkdir()
    with pytest.raises(ResponsesWriteError, match="answers.json: it is a folder; pass the path of a file"):
        save_responses([ANSWER], folder)
    assert list(folder.iterdir()) == []


def test_write_under_a_file_names_the_target(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("mine")
    target = blocker / "answers.json"
    with pytest.raises(ResponsesWriteError) as err:
        save_responses([ANSWER], target)
    assert str(target) in str(err.value) and ".tmp" not in str(err.value)
    assert f"{blocker} is a file, not a folder" in str(err.value)
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("where", ["mkstemp", "fsync", "replace"])
def test_a_failed_write_names_the_target_not_the_temporary_file(tmp_path, monkeypatch, where):
    path = save_responses([ANSWER], tmp_path / "answers.json", key={"format": 1})
    before = sha_tree(tmp_path)

    def denied(*args, **kwargs):       # what a read-only folder gives: the error names the hidden temporary file
        raise PermissionError(13, "Permission denied", str(tmp_path / ".answers.json.abc123.tmp"))
    target = instruct.tempfile if where == "mkstemp" else instruct.os
    monkeypatch.setattr(target, where, denied)
    with pytest.raises(ResponsesWriteError) as err:
        save_responses([ANSWER, ANSWER], path)                       # no key: the key file is not touched
    message = str(err.value)
    assert message.startswith(f"cannot write {path}: Permission denied"), message
    assert ".tmp" not in message and "left as it was" in message
    assert isinstance(err.value, OSError)
    assert sha_tree(tmp_path) == before                              # old answers and key kept, no temporary left


# ---- stale answers ----------------------------------------------------------------------------------------
def _tiny_base(seed=0, name="tiny"):
    torch.manual_seed(seed)
    return types.SimpleNamespace(name=name, model=GPTModel(TINY).eval())


@pytest.fixture
def smoke_cache(isolated_cache, monkeypatch):
    monkeypatch.setenv("LLM_FROM_SCRATCH_PROFILE", "smoke")
    if DATA_MIRROR:                                                  # the data files, as the test command set them
        monkeypatch.setenv("LLM_FROM_SCRATCH_DATA", DATA_MIRROR)
    return isolated_cache


def test_stale_answers_are_reported_in_one_line_and_made_again(smoke_cache, capsys):
    base = _tiny_base()
    path = instruct.ensure_test_responses(base=base, device="cpu", progress=False)
    assert "stale" not in capsys.readouterr().out                    # first time: made, nothing stale to report
    first = load_responses(path)
    assert len(first) == 110 and first[0]["model_name"] == "tiny, instruction-tuned in part 25"
    recipe = instruct.instruct_recipe()
    assert stale_reason(path, instruct.responses_key(base, recipe)) is None

    rebuilt = _tiny_base()                                           # the same name, one weight different
    with torch.no_grad():
        rebuilt.model.tok_emb.weight[0, 0] += 1.0
    assert instruct.ensure_test_responses(base=rebuilt, device="cpu", progress=False) == path
    out = capsys.readouterr().out.splitlines()[0]            # then come the training loop's own lines
    assert out.startswith("part 25's test answers are stale: ") and out.endswith("making them again.")
    assert str(path) in out and "other base-model weights" in out
    assert stale_reason(path, instruct.responses_key(rebuilt, recipe)) is None
    assert "other base-model weights" in stale_reason(path, instruct.responses_key(base, recipe))

    renamed = types.SimpleNamespace(name="another model", model=rebuilt.model)
    assert "from another base model" in stale_reason(path, instruct.responses_key(renamed, recipe))
    assert "lr: 0.001, now 0.002" in stale_reason(path, instruct.responses_key(rebuilt, {**recipe, "lr": 2e-3}))


def test_edited_unkeyed_or_corrupt_answers_are_not_reused(smoke_cache, capsys):
    base = _tiny_base()
    key = instruct.responses_key(base, instruct.instruct_recipe())
    path = instruct.test_responses_path()
    save_responses([ANSWER], path, key=key)
    assert stale_reason(path, key) is None

    path.write_text(path.read_text().replace("Red.", "Blue."))       # edited by hand after it was written
    assert "changed after it was written" in stale_reason(path, key)
    instruct.responses_key_path(path).unlink()                       # made before answers had keys
    assert "has no key file" in stale_reason(path, key)
    instruct.responses_key_path(path).write_text("{not json")
    assert "key file that cannot be read" in stale_reason(path, key)

    path.write_text('[{"instruction": ')                             # a corrupt answers file in the cache
    assert instruct.ensure_test_responses(base=base, device="cpu", progress=False) == path
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("part 25's test answers are stale: ") and "key file that cannot be read" in lines[0]
    assert sum("stale" in line for line in lines) == 1
    assert len(load_responses(path)) == 110 and stale_reason(path, key) is None
