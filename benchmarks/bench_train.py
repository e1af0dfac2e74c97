"""Training and generation throughput of GPT-2 small (124M) on this machine (part 22's benchmark; not a test).

Training: context 256, batch 8, AdamW (lr 4e-4, weight decay 0.1), random token ids; a few warm-up steps,
then timed steps (the median, measured with `llm_from_scratch.core.time_call`). Generation: 200 new tokens,
batch 1, greedy, from a short prompt. Each with the explicit attention and with PyTorch's fused
scaled_dot_product_attention (use_sdpa). Run:

    python benchmarks/bench_train.py [--steps 2] [--warmup 1] [--new-tokens 200] [--no-sdpa-compare]
"""
import argparse

import torch

from llm_from_scratch.core import describe_run, get_device, set_seed, time_call
from llm_from_scratch.generate import generate
from llm_from_scratch.loss import calc_loss_batch
from llm_from_scratch.model import GPT_CONFIG_124M, GPTModel


def bench_training(model, device, batch, context, warmup, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.cfg["vocab_size"], (batch, context), generator=g)   # (B, T)
    y = torch.randint(0, model.cfg["vocab_size"], (batch, context), generator=g)
    model.train()

    def step():
        optimizer.zero_grad()
        loss = calc_loss_batch(x, y, model, device)
        loss.backward()
        optimizer.step()

    timing = time_call(step, repeats=steps, warmup=warmup, device=device)
    return timing.rate(batch * context), timing


def bench_generation(model, device, new_tokens, context):
    model.eval()
    idx = torch.tensor([[6109, 3626, 6100, 345]], device=device)      # "Every effort moves you"
    out = generate(model, idx, 5, context)                             # warm-up, and a shape check
    assert out.shape[1] == idx.shape[1] + 5
    timing = time_call(lambda: generate(model, idx, new_tokens, context), repeats=1, warmup=0, device=device)
    return timing.rate(new_tokens), timing


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="timed training steps (default 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up training steps (default 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    ap.add_argument("--no-sdpa-compare", action="store_true", help="only the explicit attention path")
    args = ap.parse_args()

    device = get_device()
    print(describe_run(device))
    cfg = {**GPT_CONFIG_124M, "context_length": args.context}
    print(f"model: GPT-2 124M config, context {args.context}; training batch {args.batch}, "
          f"{args.warmup} warm-up + {args.steps} timed steps; generation of {args.new_tokens} tokens, batch 1, greedy")
    rows = []
    for use_sdpa in ([False] if args.no_sdpa_compare else [False, True]):
        set_seed(123)
        model = GPTModel(cfg, use_sdpa=use_sdpa).to(device)
        train_tps, step_t = bench_training(model, device, args.batch, args.context, args.warmup, args.steps)
        gen_tps, gen_t = bench_generation(model, device, args.new_tokens, args.context)
        rows.append((use_sdpa, train_tps, step_t, gen_tps))
        print(f"  use_sdpa={use_sdpa!s:5}: training {train_tps:8,.0f} tokens/s (step: {step_t})", flush=True)
        print(f"  {'':15}generation {gen_tps:6.1f} tokens/s ({args.new_tokens} tokens: {gen_t})", flush=True)
        del model
    if len(rows) == 2:
        print(f"SDPA speed-up: training x{rows[1][1] / rows[0][1]:.2f}, generation x{rows[1][3] / rows[0][3]:.2f}")


if __name__ == "__main__":
    main()
