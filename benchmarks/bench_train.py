"""Training race: GPT-2 124M, our fast path (appendix E) against the book's own package, on this machine.

Not a test (speed is never asserted). Configuration: GPT-2 124M, context 256, batch 8, dropout 0.1, AdamW
(lr 4e-4, weight decay 0.1), random token ids. The contestants, each one lever more than the one before:

  book          llms_from_scratch.ch04.GPTModel trained the book's way (eager, float32, torch.optim.AdamW)
  ours          llm_from_scratch.model.GPTModel, explicit attention, the same optimizer (the same maths)
  + sdpa        fused attention (F.scaled_dot_product_attention)
  + fused AdamW torch.optim.AdamW(fused=True)
  + bf16        bfloat16 autocast for the matmuls (weights, gradients and optimizer state stay float32)
  + pad vocab   FastGPTModel: vocabulary padded to 50,304 (logits sliced back to 50,257)
  + compile     torch.compile of the above (only with --compile; its compile time is printed separately)

All run in one process, in alternating rounds (book, ours, ..., book, ours, ...) after untimed warm-up rounds;
each contestant's median step gives tokens/s. Also printed: the measured float32 matmul peak of this machine
and each rung's share of it (model FLOPs utilisation). The last line is `train_vs_book=<x>`: the median
tokens/s of the full fast path (the last rung) over the book's. Needs the bench extra:
`pip install -e ".[bench]"` (or `pip install --no-deps llms-from-scratch==1.0.19`). Run:

    python benchmarks/bench_train.py [--rounds 2] [--warmup-rounds 1] [--compile]
"""
import argparse
import time

import torch

from llm_from_scratch.core import describe_run, set_seed
from llm_from_scratch.model import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.speed import (bf16_helps, fast_adamw, make_fast, matmul_peak_flops, median, race, train_step,
                                    training_flops_per_token)


def book_step(model, optimizer, x, y):
    "The book's four moves, with the book's loss function (llms_from_scratch.ch05.calc_loss_batch)."
    from llms_from_scratch.ch05 import calc_loss_batch
    optimizer.zero_grad()
    loss = calc_loss_batch(x, y, model, "cpu")
    loss.backward()
    optimizer.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="timed alternating rounds (default 2)")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="add a torch.compile rung (compiling takes minutes)")
    args = ap.parse_args()
    try:
        from llms_from_scratch.ch04 import GPTModel as BookGPTModel
    except ImportError:
        raise SystemExit("bench_train.py needs the book's package: pip install -e \".[bench]\" "
                         "(or pip install --no-deps llms-from-scratch==1.0.19)")

    device = torch.device("cpu")          # the race is defined on the CPU; the book's step moves batches to "cpu"
    print(describe_run(device))
    cfg = {**GPT_CONFIG_124M, "context_length": args.context}
    B, T = args.batch, args.context
    fpt = training_flops_per_token(cfg)
    peak32 = matmul_peak_flops(2048, dtype=torch.float32, device=device)
    peak16 = matmul_peak_flops(2048, dtype=torch.bfloat16, device=device)
    print(f"matmul peak (2048x2048, measured): float32 {peak32 / 1e9:,.0f} GFLOP/s, bfloat16 {peak16 / 1e9:,.0f} GFLOP/s; "
          f"training needs {fpt / 1e9:.3f} GFLOP per token")
    print(f"model: GPT-2 124M config, context {T}, batch {B}, dropout {cfg['drop_rate']}, AdamW lr 4e-4 wd 0.1; "
          f"{args.warmup_rounds} warm-up + {args.rounds} timed alternating rounds; "
          f"bfloat16 hardware support: {bf16_helps(device)}", flush=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)      # (B, T)
    y = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)
    set_seed(123)
    book = BookGPTModel(cfg).train()
    book_opt = torch.optim.AdamW(book.parameters(), lr=4e-4, weight_decay=0.1)
    ours = GPTModel(cfg).train()
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=4e-4, weight_decay=0.1)
    ours_fused = fast_adamw(ours)
    fast = make_fast(ours).train()
    fast_opt = fast_adamw(fast)
    bf16 = torch.bfloat16

    def rung(model, opt, sdpa, dtype=None):
        def step():
            model.set_sdpa(sdpa)
            train_step(model, opt, x, y, device, autocast_dtype=dtype)
        return step

    contestants = {
        "book: llms_from_scratch GPTModel, the book's way": lambda: book_step(book, book_opt, x, y),
        "ours: GPTModel, explicit attention, AdamW": rung(ours, ours_opt, False),
        "+ fused attention (SDPA)": rung(ours, ours_opt, True),
        "+ fused AdamW": rung(ours, ours_fused, True),
        "+ bfloat16 autocast": rung(ours, ours_fused, True, bf16),
        "+ vocabulary padded to 50,304": rung(fast, fast_opt, True, bf16),
    }
    if args.compile:
        compiled = make_fast(ours).train()
        compiled.compile()
        compiled_opt = fast_adamw(compiled)
        start = time.perf_counter()
        train_step(compiled, compiled_opt, x, y, device, autocast_dtype=bf16)
        print(f"torch.compile: first step (compiling) took {time.perf_counter() - start:.0f} s", flush=True)
        contestants["+ torch.compile"] = rung(compiled, compiled_opt, True, bf16)

    def show(i, times):
        print(f"  round {i + 1}: " + ", ".join(f"{t[-1]:.1f}" for t in times.values()) + " s/step", flush=True)

    times = race(contestants, rounds=args.rounds, warmup_rounds=args.warmup_rounds, device=device, on_round=show)
    book_s = median(next(iter(times.values())))
    print(f"{'contestant':52s}{'s/step':>8s}{'tok/s':>8s}{'x book':>8s}{'MFU fp32':>10s}")
    for name, ts in times.items():
        tps = B * T / median(ts)
        print(f"{name:52s}{median(ts):8.2f}{tps:8,.0f}{book_s / median(ts):8.2f}{tps * fpt / peak32:10.1%}")
    fast_name = list(times)[-1]
    print(f"fast path = '{fast_name}'")
    print(f"train_vs_book={book_s / median(times[fast_name]):.2f}")


if __name__ == "__main__":
    main()
