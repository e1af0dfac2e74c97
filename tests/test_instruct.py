"""Part 25 (llm_from_scratch.instruct): the Alpaca prompt, the 85/10/5 split, the collate function checked
against a plain reference written here from the book's rules, the responses file, and bad input."""
import json
import os
import random
import types

import pytest
import torch

from llm_from_scratch import instruct
from llm_from_scratch.download import read_text
# test_responses_path is used as instruct.test_responses_path: imported bare, pytest would collect it as a test
from llm_from_scratch.instruct import (InstructionDataError, InstructionDataset, InstructionExample,
                                       ResponsesFileError, custom_collate_fn, format_input, load_responses,
                                       save_responses, split_instruction_data)
from llm_from_scratch.loss import calc_loss_batch
from llm_from_scratch.model import GPTModel
from llm_from_scratch.tokenizer import gpt2_tokenizer

DATA_MIRROR = os.environ.get("LLM_FROM_SCRATCH_DATA")
TINY = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.0, "qkv_bias": False}


@pytest.fixture(scope="module")
def data():
    return json.loads(read_text("instruction-data.json"))


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


# ---- independent reference implementations, written from the rules, not from the library ----
def ref_format_input(entry):
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n" + entry["instruction"])
    if entry["input"] != "":
        text = text + "\n\n### Input:\n" + entry["input"]
    return text


def ref_collate(items, prompt_lengths=None, pad=50256, ignore=-100, allowed=None):
    longest = max(len(x) for x in items)
    all_inputs, all_targets = [], []
    for k, item in enumerate(items):
        seq = list(item) + [pad] * (longest + 1 - len(item))      # at least one end-of-text each
        inputs, targets = seq[:-1], seq[1:]
        for pos in range(len(targets)):
            if pos > len(item) - 1:                                 # padding after the first end-of-text target
                targets[pos] = ignore
        if prompt_lengths is not None:
            for pos in range(prompt_lengths[k] - 1):                # targets that are prompt tokens
                targets[pos] = ignore
        if allowed is not None:
            inputs, targets = inputs[:allowed], targets[:allowed]
        all_inputs.append(inputs)
        all_targets.append(targets)
    return torch.tensor(all_inputs), torch.tensor(all_targets)


def test_format_input_matches_the_book_on_the_whole_data_set(data):
    for entry in data:
        assert format_input(entry) == ref_format_input(entry)
    assert sum("### Input:" in format_input(e) for e in data) == sum(bool(e["input"]) for e in data)


def test_split_sizes_and_order(data):
    train, test, val = split_instruction_data(data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train + test + val == data


def test_dataset_holds_the_whole_texts(data, tokenizer):
    ds = InstructionDataset(data[:40], tokenizer)
    for i, entry in enumerate(data[:40]):
        full = ref_format_input(entry) + "\n\n### Response:\n" + entry["output"]
        assert ds[i] == tokenizer.encode(full)
        prompt = tokenizer.encode(ref_format_input(entry) + "\n\n### Response:\n")
        assert ds.prompt_lengths[i] == len(prompt) and ds[i][:len(prompt)] == prompt


@pytest.mark.parametrize("allowed", [None, 2, 7, 40, 1024])
def test_collate_matches_the_reference_on_the_data_set(data, tokenizer, allowed):
    ds = InstructionDataset(data, tokenizer)
    rng = random.Random(allowed or 0)
    order = list(range(len(ds)))
    rng.shuffle(order)
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]      # the whole data set, in random batches
    for batch in batches:
        items = [ds[i] for i in batch]
        got = custom_collate_fn(items, allowed_max_length=allowed)
        want = ref_collate(items, allowed=allowed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("seed", range(20))
def test_collate_matches_the_reference_on_random_batches(seed):
    rng = random.Random(seed)
    items = [[rng.randrange(50256) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
    allowed = rng.choice([None, 2, 3, 5, 20])
    pad = rng.choice([50256, 0])
    got = custom_collate_fn(items, pad_token_id=pad, allowed_max_length=allowed)
    want = ref_collate(items, pad=pad, allowed=allowed)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # prompt masking
    lengths = [rng.randint(0, len(x)) for x in items]
    got = custom_collate_fn([InstructionExample(x, p) for x, p in zip(items, lengths)], allowed_max_length=allowed)
    want = ref_collate(items, prompt_lengths=lengths, allowed=allowed)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_only_the_first_padding_target_counts(data, tokenizer):
    ds = InstructionDataset(data[:64], tokenizer)
    for start in range(0, 64, 8):
        items = [ds[i] for i in range(start, start + 8)]
        inputs, targets = custom_collate_fn(items)
        for row, item in enumerate(items):
            counted = targets[row][targets[row] != -100].tolist()
            assert counted == item[1:] + [50256]                    # the text, then exactly one end-of-text
            assert inputs[row, :len(item)].tolist() == item


def test_the_loss_ignores_the_minus_100_targets(data, tokenizer):
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    ds = InstructionDataset(data[:3], tokenizer)
    x, y = custom_collate_fn([ds[0], ds[1], ds[2]], allowed_max_length=64)
    with torch.no_grad():
        loss = calc_loss_batch(x, y, model, "cpu")
        logits = model(x)
    keep = y != -100
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[keep], y[keep]))


def test_prompt_masking_keeps_only_the_response(data, tokenizer):
    ds = InstructionDataset(data[:8], tokenizer, mask_prompt=True)
    _, targets = custom_collate_fn([ds[i] for i in range(8)])
    for row in range(8):
        ids, p = ds[row]
        assert targets[row][targets[row] != -100].tolist() == ids[p:] + [50256]


def test_bad_input_gives_clear_errors(tokenizer):
    with pytest.raises(InstructionDataError, match="not a dict"):
        format_input(["instruction", "output"])
    with pytest.raises(InstructionDataError, match="'instruction'"):
        format_input({"input": "", "output": "x"})
    with pytest.raises(InstructionDataError, match="'output'"):
        InstructionDataset([{"instruction": "Say hi.", "input": ""}], tokenizer)
    with pytest.raises(InstructionDataError, match="example 1"):
        InstructionDataset([{"instruction": "a", "input": "", "output": "b"}, "oops"], tokenizer)
    with pytest.raises(InstructionDataError, match="empty"):
        InstructionDataset([], tokenizer)
    with pytest.raises(InstructionDataError, match="empty"):
        split_instruction_data([])
    for bad in (1, 0, -3, True, 2.5):
        with pytest.raises(ValueError, match="allowed_max_length"):
            custom_collate_fn([[1, 2, 3]], allowed_max_length=bad)
    with pytest.raises(ValueError, match="empty"):
        custom_collate_fn([])


def _answers(n=3):
    return [{"instruction": f"Say {i}.", "input": "", "output": str(i), "model_response": str(i),
             "model_name": "tiny, instruction-tuned in part 25"} for i in range(n)]


def test_responses_path_follows_the_contract(isolated_cache):
    assert instruct.test_responses_path("smoke") == isolated_cache / "responses" / "instruction-test-responses-smoke.json"
    assert instruct.test_responses_path("full").name == "instruction-test-responses-full.json"
    with pytest.raises(ValueError, match="profile"):
        instruct.test_responses_path("huge")


def test_responses_round_trip_in_the_books_format(tmp_path):
    path = save_responses(_answers(), tmp_path / "r.json")
    assert load_responses(path) == _answers()
    on_disk = json.loads(path.read_text())
    assert [set(r) for r in on_disk] == [{"instruction", "input", "output", "model_response", "model_name"}] * 3


@pytest.mark.parametrize("breaks", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch, breaks):
    path = save_responses(_answers(2), tmp_path / "r.json")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(instruct.os, breaks, boom)
    with pytest.raises(OSError, match="simulated"):
        save_responses(_answers(5), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]       # no temporary file left behind


def test_bad_responses_are_refused(tmp_path):
    path = save_responses(_answers(2), tmp_path / "r.json")
    with pytest.raises(ResponsesFileError, match="model_response"):
        save_responses([{**_answers(1)[0], "model_response": None}], path)
    with pytest.raises(ResponsesFileError, match="empty"):
        save_responses([], path)
    assert load_responses(path) == _answers(2)
    path.write_text('[{"instruction": ')
    with pytest.raises(ResponsesFileError, match="not valid JSON"):
        load_responses(path)
    with pytest.raises(ResponsesFileError, match="does not exist"):
        load_responses(tmp_path / "missing.json")


def test_ensure_returns_a_fresh_file_without_work(isolated_cache, monkeypatch):
    monkeypatch.setenv("LLM_FROM_SCRATCH_PROFILE", "smoke")
    if DATA_MIRROR:                                 # isolated_cache removed it; the key reads the examples
        monkeypatch.setenv("LLM_FROM_SCRATCH_DATA", DATA_MIRROR)
    torch.manual_seed(0)
    base = types.SimpleNamespace(name="tiny", model=GPTModel(TINY).eval())
    key = instruct.responses_key(base, instruct.instruct_recipe())
    path = save_responses(_answers(), instruct.test_responses_path(), key=key)
    def made_again(*args, **kwargs):
        raise AssertionError("the answers were made again")
    monkeypatch.setattr(instruct, "save_responses", made_again)          # not part of the key's code digest
    assert instruct.ensure_test_responses(base=base, device="cpu") == path
    assert load_responses(path) == _answers()


def test_weights_digest_sees_one_changed_weight():
    torch.manual_seed(0)
    a = GPTModel(TINY)
    b = GPTModel(TINY)
    b.load_state_dict(a.state_dict())
    assert instruct.weights_digest(a) == instruct.weights_digest(b)
    with torch.no_grad():
        b.out_head.weight[3, 5] += 1e-6
    assert instruct.weights_digest(a) != instruct.weights_digest(b)
    assert instruct.weights_digest(a.to(torch.bfloat16)) != instruct.weights_digest(a.float())   # dtype counts


def test_times_trained_counts_only_training_reads(data, tokenizer):
    torch.manual_seed(0)
    model = GPTModel(TINY)
    recipe = {**instruct.instruct_recipe("smoke"), "batch_size": 2, "num_epochs": 2, "eval_freq": 1, "eval_iter": 1}
    hist = instruct.finetune_instruction_model(model, tokenizer, data[:5], data[5:7], recipe, device="cpu",
                                               progress=False)
    # 5 examples, batches of 2, drop_last: 2 batches (4 texts) per epoch; evaluation reads are not counted
    assert hist["steps_total"] == 4 and len(hist["times_trained"]) == 5
    assert sum(hist["times_trained"]) == 8 and max(hist["times_trained"]) <= 2


def test_tiny_fine_tune_and_answers(data, tokenizer):
    torch.manual_seed(0)
    model = GPTModel(TINY)
    recipe = {**instruct.instruct_recipe("smoke"), "batch_size": 2, "eval_freq": 100, "eval_iter": 1}
    hist = instruct.finetune_instruction_model(model, tokenizer, data[:4], data[4:6], recipe, device="cpu",
                                               progress=False)
    assert hist["steps_total"] == 2 and not model.training
    answers, stopped = instruct.generate_test_responses(model, tokenizer, data[:3], model_name="tiny",
                                                        max_new_tokens=3, progress=False)
    assert len(answers) == 3 and len(stopped) == 3
    assert all(r["model_name"] == "tiny" and isinstance(r["model_response"], str) for r in answers)


def test_batched_answers_equal_one_at_a_time(data, tokenizer):
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    entries = [e for e in data if not e["input"]][:6]            # several prompts share a token length
    batched = instruct.generate_responses(model, tokenizer, entries, 4)
    alone = [instruct.generate_responses(model, tokenizer, [e], 4)[0] for e in entries]
    assert batched == alone

