"""Generation race: our KV-cached `generate` (part 27) against the book package's `generate_text_simple`.

Not a test (speed is never asserted). Configuration: GPT-2 124M's shape (random weights: speed does not depend
on what the weights learned; dropout off, eval mode), float32, batch 1, a 4-token prompt ("Hello, I am"), 200 new
greedy tokens, context_size 1024 (so no cropping: the window never slides and the cache is used for every step).

  book    llms_from_scratch.ch04.GPTModel + generate_text_simple (the whole window through the model each step)
  ours    llm_from_scratch.model.GPTModel with the same weights + llm_from_scratch.generate.generate
          (use_cache=None, i.e. the KV cache: one prefill, then one token per step)

The two produce identical tokens (asserted every round). They run in one process in alternating rounds
(book, ours, book, ours, ...) after a short untimed warm-up (8 tokens each); the medians are compared. With --bf16
a third, untimed-against-the-book line shows our cached decoding with bfloat16 weights (half the bytes read
per token; its tokens may differ slightly from float32's and are not asserted). Needs the bench extra:
`pip install -e ".[bench]"` (or `pip install --no-deps llms-from-scratch==1.0.19`). Run:

    python benchmarks/bench_generate.py [--rounds 3] [--new-tokens 200] [--bf16] [--device cuda]

`--device` (default cpu, what `make bench` races) runs both models there; on a GPU each timing is fenced by
`torch.cuda.synchronize()`, so the queued kernels are counted.

The LAST line printed is always `generate_vs_book=<ratio>` (median book seconds / median ours seconds).
"""
import argparse
import statistics
import time

import torch

from llm_from_scratch.core import describe_run, get_device, set_seed
from llm_from_scratch.generate import generate
from llm_from_scratch.model import GPT_CONFIG_124M, GPTModel


def timed(fn, device=torch.device("cpu")):
    "Seconds for fn() and its result; on a GPU the work queued before and by fn() is waited for."
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed alternating rounds (default 3)")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--bf16", action="store_true", help="also time our cached decoding with bfloat16 weights")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or mps; an unavailable one is an error")
    args = ap.parse_args()
    try:
        from llms_from_scratch.ch04 import GPTModel as BookGPTModel, generate_text_simple
    except ImportError:
        raise SystemExit("bench_generate.py needs the book's package: pip install -e \".[bench]\" "
                         "(or pip install --no-deps llms-from-scratch==1.0.19)")

    device = get_device(args.device)
    print(describe_run(device))
    cfg = {**GPT_CONFIG_124M, "drop_rate": 0.0}
    set_seed(123)
    ours = GPTModel(cfg).eval()
    book = BookGPTModel(cfg).eval()
    book.load_state_dict(ours.state_dict())                       # the same weights, the book's key names
    ours, book = ours.to(device), book.to(device)
    prompt = torch.tensor([[15496, 11, 314, 716]], device=device)  # "Hello, I am" in GPT-2's tokenizer
    n, ctx = args.new_tokens, cfg["context_length"]

    run_ours = lambda: generate(ours, prompt, n, ctx)              # default: KV cache
    run_book = lambda: generate_text_simple(book, prompt, n, ctx)
    with torch.no_grad():
        generate(ours, prompt, 8, ctx), generate_text_simple(book, prompt, 8, ctx)   # short untimed warm-up
        ref, t_ours, t_book = None, [], []
        for r in range(args.rounds):
            tb, out_b = timed(run_book, device)
            to, out_o = timed(run_ours, device)
            ref = out_b if ref is None else ref
            assert torch.equal(out_o, out_b) and torch.equal(out_b, ref), "cached tokens differ from the book's"
            t_book.append(tb); t_ours.append(to)
            print(f"round {r + 1}: book {tb:6.2f} s ({n / tb:6.1f} tok/s)   ours {to:6.2f} s ({n / to:6.1f} tok/s)",
                  flush=True)
    mb, mo = statistics.median(t_book), statistics.median(t_ours)
    print(f"median: book {mb:.2f} s = {mb / n * 1e3:.1f} ms/token, ours {mo:.2f} s = {mo / n * 1e3:.1f} ms/token; "
          f"{n} identical tokens, batch 1, float32, GPT-2 124M shape, on {device}")
    if args.bf16:
        half = GPTModel(cfg).eval()
        half.load_state_dict(ours.state_dict())
        half = half.to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            generate(half, prompt, 8, ctx)                         # warm-up
            times = [timed(lambda: generate(half, prompt, n, ctx), device)[0] for _ in range(args.rounds)]
        mh = statistics.median(times)
        print(f"ours, bfloat16 weights: {mh:.2f} s = {mh / n * 1e3:.1f} ms/token ({mo / mh:.2f}x our float32)")
    print(f"generate_vs_book={mb / mo:.2f}")


if __name__ == "__main__":
    main()
