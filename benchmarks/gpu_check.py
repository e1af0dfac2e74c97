"""The course's GPU path, measured on one CUDA GPU: the pieces that benchmarks/gpu_check.sh runs in turn.

    python benchmarks/gpu_check.py preflight              what the GPU is; exits 2 with a message without CUDA
    python benchmarks/gpu_check.py ladder                 appendix E's training ladder on GPT-2 124M, MFU per rung
    python benchmarks/gpu_check.py compile                its fastest rung, eager against torch.compile
    python benchmarks/gpu_check.py decode                 part 27's KV-cached decoding against the uncached loop
    python benchmarks/gpu_check.py notebook NB.ipynb      execute a notebook (nbclient if installed, else in-process)

Not a test: nothing here is asserted about speed. What is asserted is that the GPU path computes the same
thing as the CPU path (the compiled step's first loss against the eager one, the cached prefill's logits
against the full forward). Every subcommand except `notebook` needs CUDA and says so if it is absent; set
GPU_CHECK_ALLOW_CPU=1 to dry-run the plumbing on a CPU with tiny sizes (the numbers then mean nothing).
"""
import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llm_from_scratch.core import describe_run, set_seed, time_call, versions_report  # noqa: E402
from llm_from_scratch.model import GPT_CONFIG_124M, GPTModel  # noqa: E402

# NVIDIA datasheets: dense bfloat16 tensor-core peak (no sparsity), FLOP/s. Matched on torch's device name,
# most specific first; a GPU not listed gets only the measured peak.
DATASHEET_BF16 = [("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200 NVL", 835e12),
                  ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]
ALLOW_CPU = os.environ.get("GPU_CHECK_ALLOW_CPU") == "1"


def require_cuda() -> torch.device:
    "The GPU, or exit 2 saying why not (GPU_CHECK_ALLOW_CPU=1: the CPU, for a dry run of the plumbing)."
    if torch.cuda.is_available():
        return torch.device("cuda")
    if ALLOW_CPU:
        print("GPU_CHECK_ALLOW_CPU=1: dry run on the CPU with tiny sizes; these numbers say nothing about a GPU")
        return torch.device("cpu")
    print(f"gpu_check: CUDA is not available here (torch {torch.__version__}, built with CUDA {torch.version.cuda}), "
          "so there is no GPU to check. Run this on a machine with an NVIDIA GPU and a CUDA build of torch "
          "(set GPU_CHECK_ALLOW_CPU=1 only to dry-run the script itself on a CPU).", file=sys.stderr)
    sys.exit(2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def datasheet_bf16_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, flops in DATASHEET_BF16:
        if key in name and not (key == "L4" and "L40" in name):
            return name, flops
    return name, None


def measured_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    "FLOP/s of an n x n matmul, timed over 10 products per round so that launches and syncs do not count."
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    timing = time_call(lambda: a @ b, repeats=5, number=10, warmup=3, device=device)
    return 2 * n ** 3 / timing.median


def cmd_preflight(args) -> None:
    device = require_cuda()
    report = versions_report()
    report["torch.version.cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report.update({"gpu": props.name, "compute capability": f"{props.major}.{props.minor}",
                       "gpu memory GiB": round(props.total_memory / 2**30, 1),
                       "multiprocessors": props.multi_processor_count,
                       "tf32 matmuls allowed": torch.backends.cuda.matmul.allow_tf32})
    from llm_from_scratch.speed import bf16_helps
    report["bf16_helps"] = bf16_helps(device)
    sheet16 = datasheet_bf16_peak(device)[1]
    report["datasheet bf16 peak TFLOP/s"] = sheet16 / 1e12 if sheet16 else "not in DATASHEET_BF16"
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = "not installed (torch.compile's GPU backend needs it)"
    report["torch.compile"] = "available" if hasattr(torch, "compile") else "missing"
    for key, value in report.items():
        print(f"{key:28s} {value}")
    # a tiny forward and backward on the device: the cheapest proof that the library runs there at all
    cfg = {**GPT_CONFIG_124M, "vocab_size": 1000, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2}
    set_seed(0)
    model = GPTModel(cfg).to(device)
    x = torch.randint(0, 1000, (2, 32), device=device)
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    sync(device)
    print(f"tiny GPTModel forward + backward on {device}: loss {loss.item():.4f}, ok")


def _training_setup(args):
    "Device, config, batch, FLOPs per token and the peaks that the ladder and the compile race share."
    from llm_from_scratch.speed import training_flops_per_token
    device = require_cuda()
    small = device.type != "cuda"
    cfg = {**GPT_CONFIG_124M, "context_length": args.context}
    if small:
        cfg.update(context_length=64, emb_dim=64, n_heads=4, n_layers=2)
        args.batch, args.rounds, args.warmup_rounds = 2, 1, 1
    B, T = args.batch, cfg["context_length"]
    print(describe_run(device))
    fpt = training_flops_per_token(cfg)
    n_peak = 512 if small else 8192
    peak32, peak16 = measured_peak(device, torch.float32, n_peak), measured_peak(device, torch.bfloat16, n_peak)
    name, sheet16 = datasheet_bf16_peak(device)
    tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
    print(f"{name}: measured {n_peak}x{n_peak} matmul float32 {peak32 / 1e12:.2f} TFLOP/s (TF32 {tf32}), bfloat16 "
          f"{peak16 / 1e12:.2f} TFLOP/s; datasheet bfloat16 "
          + (f"{sheet16 / 1e12:.0f} TFLOP/s" if sheet16 else "unknown (not in DATASHEET_BF16)"))
    print(f"GPT-2 124M shape, context {T}, batch {B}, dropout {cfg['drop_rate']}: {fpt / 1e9:.3f} GFLOP per "
          f"training token; {args.warmup_rounds} warm-up + {args.rounds} timed alternating rounds", flush=True)
    g = torch.Generator().manual_seed(0)
    xb = torch.randint(0, cfg["vocab_size"], (B, T), generator=g).to(device)     # (B, T)
    yb = torch.randint(0, cfg["vocab_size"], (B, T), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return dict(device=device, cfg=cfg, B=B, T=T, fpt=fpt, xb=xb, yb=yb, name=name,
                peaks={"float32": peak32, "bfloat16": peak16}, sheet16=sheet16)


def _rung(model, opt, setup, sdpa, dtype=None, cross_entropy=None):
    from llm_from_scratch.speed import train_step
    ce = {} if cross_entropy is None else {"cross_entropy": cross_entropy}

    def step():
        model.set_sdpa(sdpa)
        train_step(model, opt, setup["xb"], setup["yb"], setup["device"], autocast_dtype=dtype, **ce)
    return step


def _report(times, kinds, setup, first: str, json_path=None, extra=None) -> dict:
    "The table: s/step, range, tokens/s, speed-up over `first`, MFU against the rung's own and the bf16 peak."
    from llm_from_scratch.speed import median
    B, T, fpt, peaks, sheet16 = setup["B"], setup["T"], setup["fpt"], setup["peaks"], setup["sheet16"]
    base_s = median(times[first])
    vs16 = "MFU bf16 sheet" if sheet16 else "MFU bf16 meas."
    print(f"{'rung':46s}{'s/step':>9s}{'range':>18s}{'tok/s':>10s}{'x first':>8s}{'MFU own':>9s}{vs16:>16s}")
    result = {"device": setup["name"], "batch": B, "context": T, "flops_per_token": fpt, "peak_fp32": peaks["float32"],
              "peak_bf16": peaks["bfloat16"], "datasheet_bf16": sheet16, "rungs": {}, **(extra or {})}
    for name, ts in times.items():
        s, kind = median(ts), kinds[name]
        tps = B * T / s
        mfu_own, mfu16 = tps * fpt / peaks[kind], tps * fpt / (sheet16 or peaks["bfloat16"])
        print(f"{name:46s}{s:9.4f}{min(ts):9.4f}-{max(ts):8.4f}{tps:10,.0f}{base_s / s:8.2f}{mfu_own:9.1%}"
              f"{mfu16:16.1%}   ({kind})")
        result["rungs"][name] = {"seconds": ts, "tokens_per_s": tps, "mfu_own_peak": mfu_own, "mfu_bf16": mfu16}
    if setup["device"].type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(setup["device"]) / 2**30
        print(f"peak GPU memory: {result['max_memory_gib']:.1f} GiB")
    print("MFU own: tokens/s x FLOPs per token over the measured peak of the rung's own arithmetic (float32 or "
          "bfloat16); the last column divides every rung by the GPU's bfloat16 peak"
          + (" from the datasheet." if sheet16 else " as measured."))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def cmd_ladder(args) -> dict:
    "Appendix E's rungs, one lever more each, in alternating rounds; the last but one is the fast path."
    from llm_from_scratch.speed import chunked_cross_entropy, fast_adamw, make_fast, race
    setup = _training_setup(args)
    set_seed(123)
    base = GPTModel(setup["cfg"]).to(setup["device"]).train()
    opt_plain = torch.optim.AdamW(base.parameters(), lr=4e-4, weight_decay=0.1)    # the book's optimizer
    opt_fused = fast_adamw(base)                                                    # same weights, fused kernel
    fused = make_fast(base, pad_vocab_multiple=None).train()                      # one kernel per LayerNorm/GELU
    opt_fused_model = fast_adamw(fused)
    padded = make_fast(base).train()
    opt_padded = fast_adamw(padded)
    bf16, chunked = torch.bfloat16, chunked_cross_entropy
    rungs = {
        "baseline: explicit attention, AdamW, float32": (_rung(base, opt_plain, setup, False), "float32"),
        "+ fused attention (SDPA)": (_rung(base, opt_plain, setup, True), "float32"),
        "+ fused AdamW": (_rung(base, opt_fused, setup, True), "float32"),
        "+ bfloat16 autocast": (_rung(base, opt_fused, setup, True, bf16), "bfloat16"),
        "+ one kernel per LayerNorm and GELU": (_rung(fused, opt_fused_model, setup, True, bf16), "bfloat16"),
        "+ chunked cross-entropy (the CPU's fast path)": (_rung(fused, opt_fused_model, setup, True, bf16, chunked),
                                                           "bfloat16"),
        "+ vocabulary padded to 50,304": (_rung(padded, opt_padded, setup, True, bf16, chunked), "bfloat16"),
    }
    times = race({k: step for k, (step, _) in rungs.items()}, rounds=args.rounds, warmup_rounds=args.warmup_rounds,
                 device=setup["device"])
    return _report(times, {k: kind for k, (_, kind) in rungs.items()}, setup,
                   "baseline: explicit attention, AdamW, float32", args.json)


def cmd_compile(args) -> dict:
    "The fastest rung against its torch.compile'd copy (same weights): compile time, first losses, step times."
    from llm_from_scratch.speed import fast_adamw, make_fast, race, train_step
    setup = _training_setup(args)
    device, bf16 = setup["device"], torch.bfloat16
    set_seed(123)
    eager = make_fast(GPTModel(setup["cfg"]).to(device)).train()
    compiled = make_fast(eager).train()                     # same weights
    # in place: state_dict keys unchanged. A CPU dry run traces with dynamo only (no C++ build of kernels).
    compiled.compile(**({"backend": "eager"} if device.type != "cuda" else {}))
    opt_e, opt_c = fast_adamw(eager), fast_adamw(compiled)
    eager_first = train_step(eager, opt_e, setup["xb"], setup["yb"], device, autocast_dtype=bf16).item()
    start = time.perf_counter()
    compiled_first = train_step(compiled, opt_c, setup["xb"], setup["yb"], device, autocast_dtype=bf16).item()
    sync(device)
    compile_s = time.perf_counter() - start
    print(f"torch.compile: first step (compiling) {compile_s:.1f} s; first loss eager {eager_first:.4f}, "
          f"compiled {compiled_first:.4f} (difference {abs(eager_first - compiled_first):.4f})", flush=True)
    assert abs(eager_first - compiled_first) < 0.05, "the compiled step computes something else"
    assert list(compiled.state_dict()) == list(eager.state_dict())
    rungs = {"padded vocabulary, bf16, fused, SDPA (eager)": _rung(eager, opt_e, setup, True, bf16),
             "the same, torch.compile": _rung(compiled, opt_c, setup, True, bf16)}
    times = race(rungs, rounds=args.rounds, warmup_rounds=args.warmup_rounds, device=device)
    return _report(times, {k: "bfloat16" for k in rungs}, setup, "padded vocabulary, bf16, fused, SDPA (eager)",
                   args.json, {"compile_seconds": compile_s, "first_loss_eager": eager_first,
                               "first_loss_compiled": compiled_first})


def cmd_decode(args) -> None:
    from llm_from_scratch.generate import generate
    from llm_from_scratch.kv_cache import KVCache, cached_forward
    device = require_cuda()
    small = device.type != "cuda"
    cfg = {**GPT_CONFIG_124M, "drop_rate": 0.0}
    if small:
        cfg.update(context_length=64, emb_dim=64, n_heads=4, n_layers=2)
        args.new_tokens = min(args.new_tokens, 20)
    n, ctx = args.new_tokens, cfg["context_length"]
    print(describe_run(device))
    set_seed(123)
    model = GPTModel(cfg).to(device).eval()
    prompt = torch.tensor([[15496, 11, 314, 716]], device=device)       # "Hello, I am"
    with torch.no_grad():
        full = model(prompt)                                              # (1, 4, V)
        cached = cached_forward(model, prompt, KVCache.for_model(model, 1), last_only=False)
    diff = (full - cached).abs().max().item()
    print(f"prefill through the KV cache vs the full forward: largest logit difference {diff:.1e}")
    assert diff < 1e-3, "the cached forward computes something else on this device"
    half = GPTModel(cfg).to(device).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    batch8 = prompt.repeat(8, 1)
    runs = {"uncached loop, float32, batch 1": (lambda: generate(model, prompt, n, ctx, use_cache=False), 1),
            "KV cache, float32, batch 1": (lambda: generate(model, prompt, n, ctx), 1),
            "KV cache, bfloat16 weights, batch 1": (lambda: generate(half, prompt, n, ctx), 1),
            "KV cache, float32, batch 8": (lambda: generate(model, batch8, n, ctx), 8)}
    outs, base = {}, None
    print(f"{n} new greedy tokens after a 4-token prompt, GPT-2 124M shape (random weights), context {ctx}")
    print(f"{'decoding':38s}{'s':>8s}{'ms/step':>9s}{'tok/s':>9s}{'x uncached':>12s}")
    with torch.no_grad():
        for name, (fn, rows) in runs.items():
            outs[name] = fn()
            timing = time_call(fn, repeats=3, warmup=1, device=device)
            base = base or timing.median
            print(f"{name:38s}{timing.median:8.3f}{timing.median / n * 1e3:9.2f}{rows * n / timing.median:9,.0f}"
                  f"{base / timing.median:12.2f}")
    a, b = outs["uncached loop, float32, batch 1"], outs["KV cache, float32, batch 1"]
    same = (a == b)[0]
    print("cached and uncached float32 tokens: " + ("identical" if bool(same.all()) else
          f"first difference at new token {int((~same).nonzero()[0]) - prompt.shape[1]} (float rounding can flip "
          "a near-tie of random weights; the prefill check above is the correctness test)"))


# ---------------------------------------------------------------- notebooks

def _cell_source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _skip_flags() -> set:
    "nbdev's tst_flags from settings.ini: cells marked with one of them are skipped by nbdev_test, and here."
    import configparser
    cp = configparser.ConfigParser()
    cp.read(ROOT / "settings.ini")
    return set(cp.get("DEFAULT", "tst_flags", fallback="").split())


def _runnable(src: str, flags: set) -> str | None:
    "The cell's Python, or None if nbdev_test would skip it; IPython magics (%pip, !cmd) become `pass`."
    directives = [line.strip()[2:].strip() for line in src.splitlines() if line.strip().startswith("#|")]
    if any(d.replace(" ", "") in ("eval:false",) or d in flags for d in directives):
        return None
    lines = []
    for line in src.splitlines():
        stripped = line.lstrip()
        lines.append(line[:len(line) - len(stripped)] + "pass" if stripped.startswith(("%", "!")) else line)
    return "\n".join(lines)


def run_in_process(path: Path) -> None:
    """Execute the notebook's code cells in one namespace, in order, in the notebook's folder (what nbdev_test
    does, without IPython): for a machine with no Jupyter. The last expression of a cell is printed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nb = json.loads(path.read_text(encoding="utf-8"))
    flags, ns = _skip_flags(), {"__name__": "__main__"}
    os.chdir(path.parent)
    start = time.perf_counter()
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        src = _runnable(_cell_source(cell), flags)
        if src is None:
            print(f"--- cell {i} [{cell.get('id')}]: skipped (flag)")
            continue
        print(f"--- cell {i} [{cell.get('id')}] at {time.perf_counter() - start:.1f} s", flush=True)
        tree = ast.parse(src, filename=f"{path.name}#{i}")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, f"{path.name}#{i}", "exec"), ns)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), f"{path.name}#{i}", "eval"), ns)
            if value is not None:
                print(repr(value))
        plt.close("all")
    print(f"{path.name}: {i + 1} code cells ran in {time.perf_counter() - start:.1f} s")


def cmd_notebook(args) -> None:
    path = Path(args.notebook).resolve()
    if torch.cuda.is_available():
        print(f"executing {path.name} on {torch.cuda.get_device_name()} ({os.environ.get('LLM_FROM_SCRATCH_PROFILE', 'full')} profile)")
    elif not ALLOW_CPU:
        require_cuda()
    try:
        if os.environ.get("GPU_CHECK_IN_PROCESS") == "1":
            raise ImportError("GPU_CHECK_IN_PROCESS=1")
        import nbclient
        import nbformat
        import ipykernel  # noqa: F401  (the kernel nbclient starts)
    except ImportError:
        print("no nbclient/ipykernel here: running the code cells in this process", flush=True)
        run_in_process(path)
        return
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        if args.executed:
            nbformat.write(nb, args.executed)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                print(out["text"], end="")
    print(f"{path.name}: executed with nbclient in {time.perf_counter() - start:.1f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("preflight", help="versions, the GPU, a tiny forward/backward").set_defaults(fn=cmd_preflight)
    for name, fn, help_ in (("ladder", cmd_ladder, "appendix E's training ladder with MFU (bench_train.py's options)"),
                            ("compile", cmd_compile, "the fastest rung eager against torch.compile")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--rounds", type=int, default=5, help="timed alternating rounds (default 5)")
        p.add_argument("--warmup-rounds", type=int, default=2, help="untimed rounds first (default 2)")
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--context", type=int, default=1024)
        p.add_argument("--json", default=None, help="also write the numbers to this file")
        p.set_defaults(fn=fn)
    p = sub.add_parser("decode", help="KV-cached decoding against the uncached loop (part 27)")
    p.add_argument("--new-tokens", type=int, default=200)
    p.set_defaults(fn=cmd_decode)
    p = sub.add_parser("notebook", help="execute a notebook")
    p.add_argument("notebook")
    p.add_argument("--executed", default=None, help="with nbclient: write the executed notebook here")
    p.add_argument("--timeout", type=int, default=600, help="with nbclient: seconds per cell")
    p.set_defaults(fn=cmd_notebook)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
