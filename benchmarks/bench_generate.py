"""Generation race: our KV-cached `generate` (part 27) against the book package's decoding, and against this machine's limit.

Not a test (speed is never asserted). Configuration: GPT-2 124M's shape (random weights: speed does not depend
on what the weights learned; dropout off, eval mode), float32, batch 1, a 4-token prompt ("Hello, I am"), 200 new
greedy tokens, context_size 1024 (so no cropping: the window never slides and the cache is used for every step).

1. Bandwidth and the floor. Each timed run is bracketed by two bandwidth measurements, each the median of 3 timed
   `x.sum()` over a 1 GiB float32 tensor (after 1 untimed; 1 GiB is far beyond every cache, so it is a read from
   memory); their mean is the bandwidth during that run. This machine's bandwidth drifts by a factor of two
   within minutes, so a share is only meaningful against the bandwidth of the same moment: each contestant's
   share is the median over the rounds of (its tok/s) / (the floor at its own bandwidth). A decoding step must
   read, per token: every matrix and bias of the linear layers, every layer norm, ONE row of each embedding, and
   the cached keys and values of all layers at the step's position (averaged over the run: prompt + (n - 1) / 2
   positions). bytes / bandwidth is the shortest possible time per token; its inverse, the floor in tok/s. Each contestant's tok/s is shown with its
   share of that floor (its own bytes for the reduced-bytes variants).
2. The race, in alternating rounds in one process (after an untimed warm-up of 8 tokens each):
     book          llms_from_scratch.ch04 GPTModel + generate_text_simple (the whole window every step)
     book KV       llms_from_scratch.kv_cache.gpt2 GPTModel, the book package's own KV-cache GPT-2, driven by a
                   short loop here (prefill with use_cache=True and a fresh package KVCache, then one token per
                   call; n forward passes for n tokens). The package's kv_cache/generate.py is written for its
                   Llama/Qwen models: it calls model.reset_kv_cache(), which this GPT-2 lacks, and passes only
                   cache=, which it ignores without use_cache=True. As shipped (1.0.19) the model cannot decode
                   with its cache at all: its causal mask keeps columns where it needs the new queries' rows, so
                   the first cached step raises a shape error. Each block's attention gets the package's own
                   forward with that one slice corrected (`_book_kv_attention_forward`, the fix upstream made in
                   rasbt/LLMs-from-scratch pull request 1048); everything else is the package's.
     ours, no split  (--before only) our generate with part 27's row split switched off
                   (kv_cache._SPLIT_MODE = False): every product is the layer's own F.linear
     ours          llm_from_scratch.generate.generate (default use_cache=None: the KV cache; each matrix shape
                   takes the row split or F.linear, whichever part 27's first-use timing found faster here)
   All of them produce identical tokens (asserted every round: the same float32 weights and arithmetic).
3. Reduced bytes (on by default; --no-reduced skips; CPU only for the int8 variants), in the same rounds:
     bf16          the model converted with .to(torch.bfloat16): weights, activations and cache in bfloat16
     int8 dyn      torch.ao.quantization.quantize_dynamic on every nn.Linear, per-channel qint8 weights; the
                   activations are quantised on the fly per call (so not weight-only); FBGEMM kernels
     int8 w-only   each nn.Linear replaced by a bench-local module around torch._weight_int8pack_mm: per-channel
                   int8 weights, bfloat16 activations into the product, float32 elsewhere
   Their tokens are not asserted (rounding changes them); quality is measured instead:
4. Quality (--quality; default on for --device cpu when the course's base model is cached): the course's
   base model (load_base_model("course"), 30.5M parameters, context 256) in the same four forms, on the last 10 %
   of tinyshakespeare.txt (held out): perplexity over non-overlapping 256-token windows (--quality-windows caps
   their number), the share of positions whose argmax (teacher-forced) equals float32's, and greedy decoding of
   4 held-out prompts x 50 tokens through our cached generate: how many of the 200 tokens equal float32's at
   the same position, and how many come before each prompt's first difference. Set LLM_FROM_SCRATCH_DATA and
   HF_HUB_OFFLINE=1 on an offline machine. A missing model or text skips the section with the reason.
5. Batches (--batches 1,2,4,8 by default; --batches none skips): our cached decoding, float32, B prompts of
   4 random ids, tokens per second over the whole batch (median of --batch-rounds rounds, the sizes alternating),
   and the share of the floor for B sequences (weights read once per step, B rows of embeddings and B caches).
The default run takes about 5 minutes on the 2-core CPU (the book's uncached loop is most of it).

The `key=value` lines before the last one (`make bench` collects them): bandwidth_gbs, generate_floor_tok_s,
generate_tok_s, generate_share_of_floor, generate_products_share (the matrix-vector products alone, timed back to
back each round: their bytes / bandwidth / time), generate_vs_book_kv (ours over the book's KV-cache model, both cached),
generate_bf16_share / generate_int8_share (share of their own floors, when measured), generate_batch8_tok_s.
The LAST line printed is always `generate_vs_book=<ratio>`: median seconds of the book's uncached loop over ours.

    python benchmarks/bench_generate.py [--rounds 3] [--new-tokens 200] [--device cpu] [--before] [--no-reduced]
        [--quality | --no-quality] [--quality-windows 48] [--batches 1,2,4,8 | none] [--batch-rounds 1] [--bf16]

`--device` (default cpu, what `make bench` races) runs the race there; on a GPU each timing is fenced by
`torch.cuda.synchronize()`. `--bf16` is kept for old command lines: it puts bfloat16 into the reduced-bytes
table even with --no-reduced. Needs the bench extra: `pip install -e ".[bench]"`.
"""
import argparse
import copy
import math
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import llm_from_scratch.kv_cache as kv_cache
from llm_from_scratch.core import describe_run, get_device, set_seed
from llm_from_scratch.generate import generate
from llm_from_scratch.layer_norm import LayerNorm
from llm_from_scratch.model import GPT_CONFIG_124M, GPTModel

GiB = 2**30


def timed(fn, device=torch.device("cpu")):
    "Seconds for fn() and its result; on a GPU the work queued before and by fn() is waited for."
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def read_bandwidth(buf, device, repeats=5):
    "Bytes per second of `buf.sum()`: the median of `repeats` sums after one untimed."
    buf.sum()
    times = [timed(buf.sum, device)[0] for _ in range(repeats)]
    return buf.numel() * buf.element_size() / statistics.median(times)


# ---- int8 weight-only: a measurement contestant, not library code ------------------------------------------------
class Int8WeightOnly(nn.Module):
    """y = x W^T + b with W stored as int8 per output row (scale = max|row| / 127), via torch._weight_int8pack_mm."""
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().float())

    def forward(self, x):
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.qweight, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def int8_weight_only(model):
    m = copy.deepcopy(model)
    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                setattr(mod, name, Int8WeightOnly(child))
    return m


def int8_dynamic(model):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # its deprecation notice (torchao); the API works
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def make_variant(name, model):
    if name == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    if name == "int8 dyn":
        return int8_dynamic(model)
    if name == "int8 w-only":
        return int8_weight_only(model)
    raise ValueError(name)


def weight_bytes_per_token(model, batch=1):
    """Bytes of parameters one decoding step reads: all linear layers and norms, one embedding row per sequence."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    total = 0
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            total += (batch if mod is model.tok_emb else 1) * mod.weight.shape[1] * mod.weight.element_size()
        elif type(mod) is nn.Linear or isinstance(mod, LayerNorm):
            total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
        elif isinstance(mod, DynLinear):
            w = mod.weight()                                  # packed int8 + a float scale and int zero point per row
            total += w.numel() + w.shape[0] * 8 + (0 if mod.bias() is None else mod.bias().numel() * 4)
        elif isinstance(mod, Int8WeightOnly):
            total += sum(b.numel() * b.element_size() for b in mod.buffers(recurse=False))
    return total


def kv_bytes_per_token(model, avg_len, batch=1):
    "Keys and values of every layer at `avg_len` cached positions, in the cache's dtype (the embedding's)."
    cfg, elt = model.cfg, model.tok_emb.weight.element_size()
    return 2 * cfg["n_layers"] * avg_len * cfg["emb_dim"] * elt * batch


def _book_kv_attention_forward(self, x, use_cache=False, start_pos=0, cache=None):
    """The book package's kv_cache.gpt2 MultiHeadAttention.forward (Apache-2.0, rasbt/LLMs-from-scratch), the same
    operations in the same order, with ONE change: the causal mask keeps the rows of the new queries
    (`[-num_tokens:, :]`). The package's `[:, -num_tokens:]` keeps columns instead, so in 1.0.19 every cached step
    after the prefill fails with "output with shape [1, 12, 1, 5] doesn't match the broadcast shape [1, 12, 5, 5]";
    upstream fixed the same row selection in rasbt/LLMs-from-scratch pull request 1048."""
    b, num_tokens, _ = x.shape
    split = lambda t: t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
    keys, values, queries = split(self.W_key(x)), split(self.W_value(x)), split(self.W_query(x))
    if use_cache:
        if cache is not None:
            keys = torch.cat([cache[0], keys], dim=2)
            values = torch.cat([cache[1], values], dim=2)
        next_cache = (keys, values)
    else:
        next_cache = None
    seq_len = keys.size(2)
    causal_mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device), diagonal=1)
    causal_mask = causal_mask[-num_tokens:, :][None, None, :, :]              # the fix: rows, not columns
    attn_scores = queries @ keys.transpose(2, 3)
    attn_scores.masked_fill_(causal_mask, -torch.inf)
    attn_weights = self.dropout(torch.softmax(attn_scores / keys.shape[-1]**0.5, dim=-1))
    context_vec = (attn_weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
    return self.out_proj(context_vec), next_cache


def book_kv_model(cls, cfg):
    "The package's KV-cache GPT-2 with `_book_kv_attention_forward` in each block (see there why)."
    model = cls(cfg)
    for block in model.trf_blocks:
        block.att.forward = _book_kv_attention_forward.__get__(block.att)
    return model


def book_kv_generate(model, idx, max_new_tokens, kv_cls):
    "Greedy decoding with the book package's KV-cache GPT-2: prefill, then one token per forward pass."
    model.current_pos = 0                                     # the model's own position counter
    cache = kv_cls(n_layers=len(model.trf_blocks))
    logits = model(idx, use_cache=True, cache=cache)
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
        if step + 1 < max_new_tokens:
            logits = model(nxt, use_cache=True, cache=cache)
    return idx


def without_split(fn):
    "Run fn with part 27's row split switched off: every product is the layer's own F.linear."
    def run():
        saved = kv_cache._SPLIT_MODE
        kv_cache._SPLIT_MODE = False
        try:
            return fn()
        finally:
            kv_cache._SPLIT_MODE = saved
    return run


def products_only(model, device):
    """A function that runs one token's matrix-vector products and nothing else: every nn.Linear of `model`
    through part 27's `_decode_linear` (split or not, as timed), back to back, on a (1, 1, in) input. Its time is what a
    decoding step would cost with no attention, norms, cache writes or Python between the products."""
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    xs = {m.in_features: torch.randn(1, 1, m.in_features, device=device) for m in layers}

    def run():
        for m in layers:
            kv_cache._decode_linear(m, xs[m.in_features])
    return run


# ---- quality -----------------------------------------------------------------------------------------------------
def quality(variants, max_windows, n_prompts=4, prompt_len=24, n_new=50):
    from llm_from_scratch.base_model import course_base_model_path, load_base_model
    from llm_from_scratch.download import read_text
    from llm_from_scratch.tokenizer import gpt2_tokenizer
    if not course_base_model_path().exists():
        print("quality: skipped, the course's base model is not cached here (load_base_model('course') would "
              "pretrain it, which takes half an hour)")
        return
    try:
        base = load_base_model("course", device="cpu", progress=False)
        text = read_text("tinyshakespeare.txt")
        tok = gpt2_tokenizer()
    except Exception as e:                                    # offline without LLM_FROM_SCRATCH_DATA, ...
        print(f"quality: skipped ({type(e).__name__}: {str(e).splitlines()[0]})")
        return
    model = base.model.eval()
    held = text[int(0.9 * len(text)):]                        # the last 10 %: held out
    ids = torch.tensor(tok.encode(held))
    ctx = model.cfg["context_length"]
    n_win = min((len(ids) - 1) // ctx, max_windows)
    x = torch.stack([ids[i * ctx:(i + 1) * ctx] for i in range(n_win)])            # (W, ctx)
    y = torch.stack([ids[i * ctx + 1:(i + 1) * ctx + 1] for i in range(n_win)])    # next tokens
    starts = [int(s) for s in torch.linspace(0, len(ids) - prompt_len - 1, n_prompts)]
    prompts = torch.stack([ids[s:s + prompt_len] for s in starts])                 # (P, prompt_len)
    print(f"\nquality: {base.name}; held-out text = last 10 % of tinyshakespeare.txt ({len(held):,} characters, "
          f"{len(ids):,} tokens); perplexity over {n_win} windows of {ctx} tokens ({n_win * ctx:,} predictions); "
          f"greedy: {n_prompts} held-out prompts of {prompt_len} tokens x {n_new} new tokens, cached generate")
    models = {"float32": model}
    for name in variants:
        models[name] = make_variant(name, model)
    ref_pred = ref_gen = None
    print(f"{'variant':12s} {'MB/token':>10s} {'perplexity':>10s} {'top-1 = fp32':>12s} "
          f"{'greedy = fp32':>14s} {'before 1st diff':>16s}")
    with torch.no_grad():
        for name, m in models.items():
            nll, pred = 0.0, []
            for i in range(0, n_win, 8):
                logits = m(x[i:i + 8]).float()
                nll += F.cross_entropy(logits.flatten(0, 1), y[i:i + 8].flatten(), reduction="sum").item()
                pred.append(logits.argmax(-1))
            pred = torch.cat(pred)
            gen = generate(m, prompts, n_new, ctx)[:, prompt_len:]                 # (P, n_new)
            if ref_pred is None:
                ref_pred, ref_gen = pred, gen
            same = gen == ref_gen
            prefix = [int(r.all()) * n_new or int((~r).nonzero()[0]) for r in same]
            mb = weight_bytes_per_token(m) / 1e6
            print(f"{name:12s} {mb:10.1f} {math.exp(nll / y.numel()):10.2f} {(pred == ref_pred).float().mean():12.2%} "
                  f"{int(same.sum()):>8d} / {same.numel():<4d} {sum(prefix):>8d} / {same.numel():<4d}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed alternating rounds (default 3)")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 in the reduced-bytes table even with --no-reduced")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or mps; an unavailable one is an error")
    ap.add_argument("--no-reduced", action="store_true", help="skip bfloat16 and int8 (reduced bytes)")
    ap.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None,
                    help="quality of the reduced-bytes forms on the course's base model (default: on for cpu)")
    ap.add_argument("--quality-windows", type=int, default=48, help="held-out 256-token windows for perplexity")
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes for the batch table, or 'none'")
    ap.add_argument("--batch-rounds", type=int, default=1)
    ap.add_argument("--before", action="store_true", help="also race our cached path without the row split")
    args = ap.parse_args()
    try:
        from llms_from_scratch.ch04 import GPTModel as BookGPTModel, generate_text_simple
        from llms_from_scratch.kv_cache.gpt2 import GPTModel as BookKVGPTModel, KVCache as BookKVCache
    except ImportError:
        raise SystemExit("bench_generate.py needs the book's package: pip install -e \".[bench]\" "
                         "(or pip install --no-deps llms-from-scratch==1.0.19)")

    device = get_device(args.device)
    print(describe_run(device))
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    cfg = {**GPT_CONFIG_124M, "drop_rate": 0.0}
    set_seed(123)
    ours = GPTModel(cfg).eval()
    state = ours.state_dict()
    book = BookGPTModel(cfg).eval()
    book.load_state_dict(state)                                    # the same weights, the book's key names
    book_kv = book_kv_model(BookKVGPTModel, cfg).eval()
    missing, unexpected = book_kv.load_state_dict(state, strict=False)
    assert not missing and all(k.endswith(".att.mask") for k in unexpected), (missing, unexpected)  # no mask buffer
    ours, book, book_kv = ours.to(device), book.to(device), book_kv.to(device)
    prompt = torch.tensor([[15496, 11, 314, 716]], device=device)  # "Hello, I am" in GPT-2's tokenizer
    n, ctx = args.new_tokens, cfg["context_length"]
    avg_len = prompt.shape[1] + (n - 1) / 2                        # cached positions read, averaged over the steps

    reduced = [] if args.no_reduced else ["bf16", "int8 dyn", "int8 w-only"]
    if args.bf16 and "bf16" not in reduced:
        reduced.insert(0, "bf16")
    if device.type != "cpu" and any(r.startswith("int8") for r in reduced):
        print("int8 variants: skipped, their kernels (FBGEMM, _weight_int8pack_mm) are measured on the CPU only")
        reduced = [r for r in reduced if not r.startswith("int8")]
    variants = {r: make_variant(r, ours.cpu()).to(device) for r in reduced}
    ours = ours.to(device)

    contestants = {                                                # name -> (fn, asserted equal to the book's tokens)
        "book": (lambda: generate_text_simple(book, prompt, n, ctx), True),
        "book KV": (lambda: book_kv_generate(book_kv, prompt, n, BookKVCache), True),
        "ours, no split": (without_split(lambda: generate(ours, prompt, n, ctx)), True),
        "ours": (lambda: generate(ours, prompt, n, ctx), True),
    }
    if not args.before:
        del contestants["ours, no split"]
    for r, m in variants.items():
        contestants[r] = (lambda m=m: generate(m, prompt, n, ctx), False)
    floors = {}                                                    # bytes per token; the book's models: ours'
    for name in contestants:
        m = variants.get(name, ours)
        floors[name] = weight_bytes_per_token(m) + kv_bytes_per_token(m, avg_len)

    buf = torch.ones(GiB // 4, device=device)                      # 1 GiB of float32
    products = products_only(ours, device)
    bws, prod_times, times = [], [], {k: [] for k in contestants}
    bw_at = {k: [] for k in contestants}                           # the bandwidth around each timed run
    with torch.no_grad():
        n = 8                                                      # the closures read n: a short untimed warm-up
        for fn, _ in contestants.values():
            fn()
        products()
        n = args.new_tokens
        ref = None
        for r in range(args.rounds):
            line = [f"round {r + 1}:"]
            for name, (fn, check) in contestants.items():
                # this machine's bandwidth drifts within a minute, so each run gets its own: the mean of a
                # measurement just before and one just after it
                before = read_bandwidth(buf, device, repeats=3)
                t, out = timed(fn, device)
                bw_at[name].append((before + read_bandwidth(buf, device, repeats=3)) / 2)
                times[name].append(t)
                if check:
                    ref = out if ref is None else ref
                    assert torch.equal(out, ref), f"{name}: tokens differ from the book's"
                line.append(f"{name} {n / t:5.1f}")
                if name == "ours":                                 # the products alone, right after ours
                    prod_times.append(statistics.median(timed(products, device)[0] for _ in range(5)))
            bws.extend(b[-1] for b in bw_at.values())
            share = n / times["ours"][-1] / (bw_at["ours"][-1] / floors["ours"])
            print("   ".join(line) + f" tok/s; ours at {share:.0%} of its floor (memory {bw_at['ours'][-1] / 1e9:.1f} "
                  f"GB/s around it; products alone {prod_times[-1] * 1e3:.1f} ms)", flush=True)
    del buf
    bw = statistics.median(bw_at["ours"])
    print(f"\nmemory read bandwidth around our runs: {bw / 1e9:.1f} GB/s (median over {args.rounds} rounds; each run's "
          f"bandwidth is the mean of 3 timed x.sum() over a 1 GiB float32 tensor just before it and 3 just after); all "
          f"runs ranged {min(bws) / 1e9:.1f}-{max(bws) / 1e9:.1f} GB/s. Shares below: each run against the bandwidth "
          f"around it, median over the rounds")
    w32, kv32 = weight_bytes_per_token(ours), kv_bytes_per_token(ours, avg_len)
    floor_tps = bw / (w32 + kv32)
    print(f"bytes read per token, float32: weights {w32 / 1e6:.1f} MB (every linear layer's matrix and bias, "
          f"every layer norm, one row of each embedding) + KV cache {kv32 / 1e6:.1f} MB (all layers at the average "
          f"position {avg_len:.1f}) = {(w32 + kv32) / 1e6:.1f} MB -> floor {1e3 / floor_tps:.1f} ms/token = "
          f"{floor_tps:.1f} tok/s")
    med = {k: statistics.median(v) for k, v in times.items()}
    shares = {k: statistics.median(n / t / (b / floors[k]) for t, b in zip(times[k], bw_at[k])) for k in contestants}
    prod_s = statistics.median(prod_times)
    lin_bytes = sum(p.numel() * p.element_size() for m in ours.modules() if type(m) is nn.Linear for p in m.parameters())
    prod_share = statistics.median(lin_bytes / b / p for b, p in zip(bw_at["ours"], prod_times))
    print(f"the products alone (every linear layer's matrix-vector product through _decode_linear, back to back): "
          f"{prod_s * 1e3:.1f} ms per token for {lin_bytes / 1e6:.1f} MB = {lin_bytes / prod_s / 1e9:.1f} GB/s, "
          f"{prod_share:.0%} of the read bandwidth; the whole cached step: {med['ours'] / n * 1e3:.1f} ms, "
          f"so {med['ours'] / n * 1e3 - prod_s * 1e3:.1f} ms of each step is everything else")
    chosen = ", ".join(f"{o}x{i}{'' if bias else ' no bias'}{'' if r == 1 else f' ({r} rows)'}: "
                       f"{'split' if sp < pl else 'F.linear'} ({sp * 1e6:.0f} vs {pl * 1e6:.0f} us)"
                       for (o, i, r, _, bias), (sp, pl) in kv_cache._SPLIT_TIMINGS.items())
    print(f"part 27's first-use timing, row split vs F.linear per matrix shape: {chosen or 'none (not on a CPU)'}")
    print(f"\n{'contestant':16s} {'tok/s':>7s} {'ms/token':>9s} {'MB/token':>9s} {'floor tok/s':>11s} {'share':>7s}  tokens")
    for name in contestants:
        tps, fl = n / med[name], statistics.median(bw_at[name]) / floors[name]
        same = "identical (asserted)" if contestants[name][1] else "not asserted (see quality)"
        print(f"{name:16s} {tps:7.1f} {med[name] / n * 1e3:9.1f} {floors[name] / 1e6:9.1f} {fl:11.1f} "
              f"{shares[name]:7.1%}  {same}")
    print(f"{n} new tokens, batch 1, GPT-2 124M shape, on {device}; book/ours = {med['book'] / med['ours']:.2f}x, "
          f"book KV/ours = {med['book KV'] / med['ours']:.2f}x" + (f", ours vs ours without the split = "
          f"{med['ours, no split'] / med['ours']:.2f}x" if args.before else ""), flush=True)

    print(f"(race: {time.perf_counter() - t_start:.0f} s so far)")
    want_quality = args.quality if args.quality is not None else device.type == "cpu"
    if want_quality and reduced:
        quality(reduced, args.quality_windows)
    elif want_quality:
        print("quality: skipped, no reduced-bytes variant to compare")

    print(f"(quality done: {time.perf_counter() - t_start:.0f} s so far)")
    batch8 = None
    sizes = [] if args.batches.strip().lower() in ("", "none") else [int(b) for b in args.batches.split(",")]
    if sizes:
        print(f"\nbatches: our cached decoding, float32, {n} new tokens per sequence, median of {args.batch_rounds} "
              f"rounds (alternating sizes); floor = bandwidth / (weights once + B embedding rows + B caches)")
        g = torch.Generator().manual_seed(0)
        prompts = {b: torch.randint(0, cfg["vocab_size"], (b, prompt.shape[1]), generator=g).to(device) for b in sizes}
        bt, bb = {b: [] for b in sizes}, {b: [] for b in sizes}     # seconds, bandwidth around each run
        buf = torch.ones(GiB // 4, device=device)
        with torch.no_grad():
            for b in sizes:
                generate(ours, prompts[b], 4, ctx)                 # warm-up
            for _ in range(args.batch_rounds):
                for b in sizes:
                    before = read_bandwidth(buf, device, repeats=3)
                    bt[b].append(timed(lambda: generate(ours, prompts[b], n, ctx), device)[0])
                    bb[b].append((before + read_bandwidth(buf, device, repeats=3)) / 2)
        del buf
        print(f"{'batch':>5s} {'tok/s (all)':>11s} {'per sequence':>12s} {'ms/step':>8s} {'GB/s':>6s} {'floor tok/s':>11s} "
              f"{'share':>7s}")
        for b in sizes:
            t = statistics.median(bt[b])
            tps = b * n / t
            bytes_b = weight_bytes_per_token(ours, batch=b) + kv_bytes_per_token(ours, avg_len, batch=b)
            fl = b * statistics.median(bb[b]) / bytes_b
            share = statistics.median(b * n / tt / (bw_b * b / bytes_b) for tt, bw_b in zip(bt[b], bb[b]))
            print(f"{b:5d} {tps:11.1f} {n / t:12.1f} {t / n * 1e3:8.1f} {statistics.median(bb[b]) / 1e9:6.1f} {fl:11.1f} "
                  f"{share:7.1%}")
            if b == 8:
                batch8 = tps

    load1 = os.getloadavg()
    print(f"\nload average (1 min) at the start {load0[0]:.2f}, at the end {load1[0]:.2f} (this run keeps both "
          f"cores busy, so about 2 is its own); {time.perf_counter() - t_start:.0f} s in all")
    tps_ours = n / med["ours"]
    print(f"bandwidth_gbs={bw / 1e9:.2f}")
    print(f"generate_floor_tok_s={floor_tps:.2f}")
    print(f"generate_tok_s={tps_ours:.2f}")
    print(f"generate_share_of_floor={shares['ours']:.3f}")
    print(f"generate_products_share={prod_share:.3f}")
    print(f"generate_vs_book_kv={med['book KV'] / med['ours']:.2f}")
    for key, name in (("generate_bf16_share", "bf16"), ("generate_int8_share", "int8 dyn")):
        if name in med:
            print(f"{key}={shares[name]:.3f}")
    if batch8 is not None:
        print(f"generate_batch8_tok_s={batch8:.2f}")
    print(f"generate_vs_book={med['book'] / med['ours']:.2f}")


if __name__ == "__main__":
    main()
