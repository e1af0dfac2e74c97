"""Training race: GPT-2 124M, our fast path (appendix E) against the book's own package, on this machine.

Not a test (speed is never asserted). Configuration: GPT-2 124M, context 256, batch 8, dropout 0.1, AdamW
(lr 4e-4, weight decay 0.1), random token ids. The contestants:

  book            llms_from_scratch.ch04.GPTModel trained the book's way (eager, float32, torch.optim.AdamW)
  book + levers   the same model with the two levers that need no change to it: fused AdamW and bfloat16
                  autocast (the strongest version of the book's model, the yardstick that matters)
  ours            llm_from_scratch.model.GPTModel, explicit attention, the same optimizer (the same maths)
  + sdpa          fused attention (F.scaled_dot_product_attention); on a CPU it has no fused kernel with dropout
  + fused AdamW   torch.optim.AdamW(fused=True)
  + bf16          bfloat16 autocast for the matmuls (weights, gradients and optimizer state stay float32)
  + explicit att  back to the explicit attention: the same work as book + levers, in our code
  + small ops     FastGPTModel (unpadded): one kernel per LayerNorm and GELU (F.layer_norm, F.gelu)
  + chunked CE    train_step(cross_entropy=chunked_cross_entropy): the loss without full-size float32 copies
                  of the logits
  + cheap dropout FastGPTModel's fast_dropout: each mask from 32 random bits instead of PyTorch's bernoulli_
                  (same distribution, other draws than the rungs above). OUR FAST PATH on a CPU
  + pad vocab     the fast path with the vocabulary padded to 50,304 (a GPU lever: appendix E measured it
                  slower on this CPU, so it is raced but not part of the fast path)
  + compile       torch.compile of the fast path's model (only with --compile; compile time printed apart)

All run in one process, in alternating rounds (book, ours, ..., book, ours, ...) after untimed warm-up rounds;
each contestant's median step gives tokens/s, and the spread (slowest minus fastest round) says how much to
trust a difference. The limit is measured in the same run: the matmul peak of float32 and of bfloat16 on this
machine; each contestant's MFU (model FLOPs utilisation) is against the peak of the arithmetic it uses. The
last lines are `train_mfu=<share of the bf16 peak reached by the fast path>`, `train_vs_book_levers=<x>` and
`train_vs_book=<x>` (median seconds of the other over ours). Needs the bench extra:
`pip install -e ".[bench]"` (or `pip install --no-deps llms-from-scratch==1.0.19`). Run:

    python benchmarks/bench_train.py [--rounds 3] [--warmup-rounds 1] [--compile]
"""
import argparse
import time

import torch

from llm_from_scratch.core import describe_run, set_seed
from llm_from_scratch.model import GPT_CONFIG_124M, GPTModel
from llm_from_scratch.speed import (bf16_helps, chunked_cross_entropy, fast_adamw, make_fast, matmul_peak_flops, median,
                                    race, train_step, training_flops_per_token)


BOOK = "book: llms_from_scratch GPTModel, the book's way"
BOOK_LEVERS = "book's model + fused AdamW + bf16 autocast"
FAST = "+ cheaper dropout masks: OUR FAST PATH"   # on a CPU: appendix E measured the padded vocabulary slower here


def book_step(model, optimizer, x, y, autocast_dtype=None):
    """The book's four moves, with the book's loss function (llms_from_scratch.ch05.calc_loss_batch); with
    `autocast_dtype`, the forward pass and the loss run under autocast, as `train_step` does for ours."""
    from llms_from_scratch.ch05 import calc_loss_batch
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = calc_loss_batch(x, y, model, "cpu")
    loss.backward()
    optimizer.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed alternating rounds (default 3)")
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
    fused = make_fast(ours, pad_vocab_multiple=None).train()          # same weights, one kernel per LayerNorm/GELU
    fused_opt = fast_adamw(fused)
    padded = make_fast(ours).train()                                  # the fast path with a padded vocabulary
    padded_opt = fast_adamw(padded)
    bf16 = torch.bfloat16
    chunked = chunked_cross_entropy

    def rung(model, opt, sdpa, dtype=None, cross_entropy=torch.nn.functional.cross_entropy, cheap_dropout=True):
        def step():
            model.set_sdpa(sdpa)
            if hasattr(model, "fast_dropout"):
                model.fast_dropout = cheap_dropout                    # FastGPTModel: which coin flips
            train_step(model, opt, x, y, device, autocast_dtype=dtype, cross_entropy=cross_entropy)
        return step

    book_fused = torch.optim.AdamW(book.parameters(), lr=4e-4, weight_decay=0.1, fused=True)

    def book_rung(opt, dtype=None):
        return lambda: book_step(book, opt, x, y, dtype)

    contestants = {                                                   # name -> (step, arithmetic of its matmuls)
        BOOK: (book_rung(book_opt), "fp32"),
        BOOK_LEVERS: (book_rung(book_fused, bf16), "bf16"),
        "ours: GPTModel, explicit attention, AdamW": (rung(ours, ours_opt, False), "fp32"),
        "+ fused attention (SDPA)": (rung(ours, ours_opt, True), "fp32"),
        "+ fused AdamW": (rung(ours, ours_fused, True), "fp32"),
        "+ bfloat16 autocast": (rung(ours, ours_fused, True, bf16), "bf16"),
        "+ explicit attention under dropout": (rung(ours, ours_fused, False, bf16), "bf16"),
        "+ one kernel per LayerNorm and GELU": (rung(fused, fused_opt, True, bf16, cheap_dropout=False), "bf16"),
        "+ chunked cross-entropy": (rung(fused, fused_opt, True, bf16, chunked, cheap_dropout=False), "bf16"),
        FAST: (rung(fused, fused_opt, True, bf16, chunked), "bf16"),
        "+ vocabulary padded to 50,304": (rung(padded, padded_opt, True, bf16, chunked), "bf16"),
    }
    if args.compile:
        compiled = make_fast(ours, pad_vocab_multiple=None).train()
        compiled.compile()
        compiled_opt = fast_adamw(compiled)
        start = time.perf_counter()
        train_step(compiled, compiled_opt, x, y, device, autocast_dtype=bf16, cross_entropy=chunked)
        print(f"torch.compile: first step (compiling) took {time.perf_counter() - start:.0f} s", flush=True)
        contestants["+ torch.compile"] = (rung(compiled, compiled_opt, True, bf16, chunked), "bf16")

    def show(i, times):
        print(f"  round {i + 1}: " + ", ".join(f"{t[-1]:.1f}" for t in times.values()) + " s/step", flush=True)

    times = race({name: step for name, (step, _) in contestants.items()}, rounds=args.rounds,
                 warmup_rounds=args.warmup_rounds, device=device, on_round=show)
    book_s = median(times[BOOK])
    print(f"{'contestant':52s}{'s/step':>8s}{'spread':>8s}{'tok/s':>8s}{'x book':>8s}{'MFU':>7s}  of the peak of")
    for name, ts in times.items():
        tps = B * T / median(ts)
        arith = contestants[name][1]
        peak = peak16 if arith == "bf16" else peak32
        print(f"{name:52s}{median(ts):8.2f}{max(ts) - min(ts):8.2f}{tps:8,.0f}{book_s / median(ts):8.2f}"
              f"{tps * fpt / peak:7.1%}  {arith}")
    fast_s, levers_s = median(times[FAST]), median(times[BOOK_LEVERS])
    print(f"fast path = FastGPTModel (unpadded: fused small ops, explicit attention under dropout on a CPU, "
          f"cheaper dropout masks), fused AdamW, bfloat16 autocast, chunked cross-entropy ('{FAST}')")
    print(f"train_mfu={B * T / fast_s * fpt / peak16:.3f}")
    print(f"train_vs_book_levers={levers_s / fast_s:.2f}")
    print(f"train_vs_book={book_s / fast_s:.2f}")


if __name__ == "__main__":
    main()
