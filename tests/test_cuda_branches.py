"""The library's CUDA (and MPS) branches, run on a CPU-only torch by replacing the device queries.

The tests run where `torch.cuda.is_available()` is False, so every `if device.type == "cuda"` branch would
otherwise go untested until a reader hits it on Colab. Here `torch.cuda.is_available`, `synchronize`,
`is_bf16_supported`, `device_count`, `set_device`, `torch.backends.mps.is_available`, `dist.init_process_group`
and friends are replaced with recorders, and each test asserts what the branch decided (the device, the
backend, the calls made), not only that it ran.

What cannot run without a GPU, and is left to benchmarks/gpu_check.sh: creating a CUDA tensor (so no kernel,
autocast on "cuda", NCCL or `torch.compile`'s inductor code runs here), `matmul_peak_flops` on CUDA, and
`load_gpt2_from_dir`'s default move to `get_device()`. As a stand-in for "another device", the last tests run
the model on PyTorch's `meta` device: a tensor made on the CPU by mistake inside a forward pass, the KV cache
or a training step meets a meta tensor there and raises, as it would meet a CUDA tensor on a GPU.
"""
import contextlib
import datetime

import pytest
import torch
import torch.distributed as dist

from llm_from_scratch import core, speed
from llm_from_scratch.checkpoint import capture_rng_state, restore_rng_state
from llm_from_scratch.kv_cache import KVCache, KVCacheError, cached_forward
from llm_from_scratch.loss import calc_loss_batch
from llm_from_scratch.model import GPTModel

TINY = {"vocab_size": 100, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
        "qkv_bias": False}


def fake_cuda(monkeypatch, available=True, count=1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)


def fake_mps(monkeypatch, available):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)


# ---------------------------------------------------------------- get_device and the run labels (part 1)

@pytest.mark.parametrize("cuda, mps, want", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                             (False, False, "cpu")])
def test_get_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    fake_cuda(monkeypatch, cuda)
    fake_mps(monkeypatch, mps)
    assert core.get_device() == torch.device(want)


def test_get_device_without_an_mps_backend_falls_back_to_cpu(monkeypatch):
    fake_cuda(monkeypatch, False)
    monkeypatch.delattr(torch.backends, "mps")              # a torch built without MPS support
    assert core.get_device() == torch.device("cpu")


def test_get_device_honours_an_available_preference(monkeypatch):
    fake_cuda(monkeypatch, True)
    fake_mps(monkeypatch, True)
    assert core.get_device("cuda") == torch.device("cuda")
    assert core.get_device("cuda:1") == torch.device("cuda", 1)
    assert core.get_device(torch.device("mps")) == torch.device("mps")
    assert core.get_device("cpu") == torch.device("cpu")     # the CPU is always a valid choice


def test_get_device_refuses_an_unavailable_preference(monkeypatch):
    fake_cuda(monkeypatch, False)
    fake_mps(monkeypatch, False)
    with pytest.raises(RuntimeError, match="CUDA was requested.*prefer='cpu'"):
        core.get_device("cuda")
    with pytest.raises(RuntimeError, match="MPS was requested"):
        core.get_device("mps")


def test_run_labels_name_the_gpu(monkeypatch):
    fake_cuda(monkeypatch, True)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: asked.append(dev) or "NVIDIA H100 80GB HBM3")
    assert core.describe_hardware() == f"GPU NVIDIA H100 80GB HBM3 (torch {torch.__version__})"
    assert asked == [torch.device("cuda")]
    assert core.describe_run("cuda").endswith("profile on GPU NVIDIA H100 80GB HBM3 (torch " + torch.__version__ + ")")
    report = core.versions_report()
    assert report["cuda available"] is True and report["device"] == "cuda"
    assert report["hardware"].startswith("GPU NVIDIA H100")


def test_run_label_for_mps(monkeypatch):
    assert core.describe_hardware("mps").startswith("Apple MPS on ")


# ---------------------------------------------------------------- time_call synchronises the device (part 1)

def _timed_events(monkeypatch, device, **kwargs):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: events.append(("cuda sync", dev)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: events.append(("mps sync", None)))
    timing = core.time_call(lambda: events.append("call"), device=device, **kwargs)
    return timing, events


def test_time_call_synchronises_cuda_around_every_round(monkeypatch):
    timing, events = _timed_events(monkeypatch, "cuda", repeats=2, number=3, warmup=1)
    sync = ("cuda sync", torch.device("cuda"))
    # warm-up calls are not fenced; each timed round is: sync, `number` calls, sync (queued GPU work counted)
    assert events == ["call", sync, "call", "call", "call", sync, sync, "call", "call", "call", sync]
    assert timing.device == "cuda" and timing.repeats == 2 and timing.number == 3


def test_time_call_synchronises_mps(monkeypatch):
    timing, events = _timed_events(monkeypatch, "mps", repeats=1, number=1, warmup=0)
    assert events == [("mps sync", None), "call", ("mps sync", None)]
    assert timing.device == "mps"


def test_time_call_on_cpu_does_not_synchronise(monkeypatch):
    _, events = _timed_events(monkeypatch, "cpu", repeats=2, number=1, warmup=0)
    assert events == ["call", "call"]


def test_time_call_defaults_to_the_gpu_it_would_train_on(monkeypatch):
    fake_cuda(monkeypatch, True)
    timing, events = _timed_events(monkeypatch, None, repeats=1, number=1, warmup=0)
    assert timing.device == "cuda" and events[0] == ("cuda sync", torch.device("cuda"))


# ---------------------------------------------------------------- bfloat16 and autocast (appendix E)

def test_bf16_helps_counts_bf16_units_not_emulation(monkeypatch):
    asked = []

    def t4(including_emulation=True):                       # a T4 (sm_75): bf16 only emulated
        asked.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", t4)
    assert speed.bf16_helps("cuda") is False
    assert asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)   # A100, H100
    assert speed.bf16_helps(torch.device("cuda", 0)) is True


def test_bf16_helps_with_a_torch_that_has_no_emulation_argument(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert speed.bf16_helps("cuda") is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert speed.bf16_helps("cuda") is False


def test_bf16_helps_on_cpu_and_mps(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert speed.bf16_helps("cpu") is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert speed.bf16_helps("cpu") is False
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert speed.bf16_helps("cpu") is False
    assert speed.bf16_helps("mps") is False


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_train_step_autocasts_on_the_devices_type(monkeypatch, dtype):
    """On "cuda", train_step opens torch.autocast("cuda", dtype=...) enabled only when a dtype is asked for, and
    hands the device to the loss (which moves the batch there). Autocast and the loss are recorders here."""
    opened, devices = [], []

    @contextlib.contextmanager
    def autocast(device_type, dtype=None, enabled=True):
        opened.append((device_type, dtype, enabled))
        yield

    def loss_on_cpu(x, y, model, device, **kwargs):
        devices.append(device)
        return calc_loss_batch(x, y, model, "cpu", **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)
    monkeypatch.setattr(speed, "calc_loss_batch", loss_on_cpu)
    torch.manual_seed(0)
    model = GPTModel({**TINY, "drop_rate": 0.0})
    before = model.out_head.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 100, (2, 8))
    loss = speed.train_step(model, opt, x, x, "cuda", autocast_dtype=dtype)
    assert opened == [("cuda", dtype or torch.bfloat16, dtype is not None)]
    assert devices == [torch.device("cuda")]
    assert not loss.requires_grad and loss.dim() == 0
    assert not torch.equal(model.out_head.weight, before)   # the optimizer stepped


# ---------------------------------------------------------------- DDP: backend and device (appendix E)

@pytest.fixture
def torchrun(monkeypatch):
    """A process that torchrun started: init_process_group and set_device are recorders."""
    calls = {"init": [], "set_device": []}
    monkeypatch.setattr(dist, "is_torchelastic_launched", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, timeout=None: calls["init"].append((backend, timeout)))
    monkeypatch.setattr(dist, "get_node_local_rank", lambda fallback_rank=None: int(__import__("os").environ["LOCAL_RANK"]))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "placeholder")   # so that the value the code sets is undone afterwards
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")

    def launch(local_rank=0, local_world=1):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    calls["launch"] = launch
    return calls


def test_ddp_uses_nccl_and_one_gpu_per_process(monkeypatch, torchrun):
    fake_cuda(monkeypatch, True, count=2)
    torchrun["launch"](local_rank=1, local_world=2)
    device = speed.setup_distributed(timeout_s=42)
    assert torchrun["init"] == [("nccl", datetime.timedelta(seconds=42))]
    assert torchrun["set_device"] == [1] and device == torch.device("cuda", 1)
    assert "GLOO_SOCKET_IFNAME" not in __import__("os").environ


def test_ddp_single_gpu_single_process_is_nccl_on_gpu_0(monkeypatch, torchrun):
    fake_cuda(monkeypatch, True, count=1)
    torchrun["launch"](local_rank=0, local_world=1)
    assert speed.setup_distributed() == torch.device("cuda", 0)
    assert [b for b, _ in torchrun["init"]] == ["nccl"] and torchrun["set_device"] == [0]


def test_ddp_more_processes_than_gpus_falls_back_to_gloo_on_cpu(monkeypatch, torchrun):
    "Appendix E's two-process demo on a one-GPU machine (Colab): NCCL cannot put two ranks on one GPU."
    fake_cuda(monkeypatch, True, count=1)
    torchrun["launch"](local_rank=1, local_world=2)
    assert speed.setup_distributed() == torch.device("cpu")
    assert [b for b, _ in torchrun["init"]] == ["gloo"] and torchrun["set_device"] == []
    assert __import__("os").environ["GLOO_SOCKET_IFNAME"] == "lo"     # loopback only, as on a CPU machine


def test_ddp_without_cuda_is_gloo(monkeypatch, torchrun):
    fake_cuda(monkeypatch, False)
    torchrun["launch"](local_rank=0, local_world=2)
    assert speed.setup_distributed() == torch.device("cpu")
    assert [b for b, _ in torchrun["init"]] == ["gloo"] and torchrun["set_device"] == []


def test_ddp_gloo_asked_for_with_gpus_stays_on_cpu(monkeypatch, torchrun):
    fake_cuda(monkeypatch, True, count=8)
    torchrun["launch"](local_rank=3, local_world=8)
    assert speed.setup_distributed("gloo") == torch.device("cpu")
    assert [b for b, _ in torchrun["init"]] == ["gloo"] and torchrun["set_device"] == []


def test_ddp_nccl_asked_for_without_enough_gpus_says_why(monkeypatch, torchrun):
    fake_cuda(monkeypatch, True, count=1)
    torchrun["launch"](local_rank=0, local_world=2)
    with pytest.raises(RuntimeError, match=r"NCCL needs a GPU per process.*--nproc_per_node=1"):
        speed.setup_distributed("nccl")
    assert torchrun["init"] == []                            # refused before joining anything


@pytest.mark.parametrize("device, want", [("cuda", [2]), ("cuda:1", [1]), (torch.device("cuda", 0), [0]),
                                          ("cpu", None)])
def test_ddp_wrap_pins_the_process_gpu(monkeypatch, device, want):
    made = []
    monkeypatch.setattr(speed, "DistributedDataParallel", lambda model, device_ids=None: made.append(device_ids) or model)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)     # what setup_distributed's set_device chose
    speed.ddp_wrap(torch.nn.Linear(2, 2), device)
    assert made == [want]


# ---------------------------------------------------------------- random states of every GPU (appendix C)

def test_rng_state_includes_every_gpu_and_is_put_back(monkeypatch):
    fake_cuda(monkeypatch, True, count=2)
    gpu_states = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    put_back = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: gpu_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: put_back.append(states))
    state = capture_rng_state()
    assert state["cuda"] is gpu_states and torch.equal(state["torch"], torch.get_rng_state())
    restore_rng_state(state)
    assert len(put_back) == 1 and all(torch.equal(a, b) and a.device.type == "cpu"
                                      for a, b in zip(put_back[0], gpu_states))


def test_rng_state_from_a_gpu_run_restores_on_a_cpu_machine(monkeypatch):
    fake_cuda(monkeypatch, False)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("no GPU to put the state on"))
    saved = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)]}
    restore_rng_state(saved)                                 # the CPU state only, no error
    assert "cuda" not in capture_rng_state()


# ---------------------------------------------------------------- a seeded chat samples on the model's device

def test_chat_session_generator_follows_the_model(monkeypatch):
    "torch.multinomial needs a generator on the probabilities' device: a CPU generator fails for a GPU model."
    from llm_from_scratch.chat import ChatSession
    made = []
    real = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device="cpu": made.append(torch.device(device)) or real())
    model = GPTModel({**TINY, "context_length": 64}).to("meta")          # a device other than the CPU
    ChatSession(model, tokenizer=None, max_new_tokens=8, seed=1)
    assert made == [torch.device("meta")]


# ---------------------------------------------------------------- torch.compile (appendix E)

def test_fast_model_compiles_with_one_break_at_the_input_check():
    """What `torch.compile` traces (dynamo, with the eager backend: no C compiler needed) equals the eager model;
    `_check_input` is kept out of the graph but still runs, so a bad id is refused by the compiled model too."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    fast = speed.make_fast(GPTModel({**TINY, "drop_rate": 0.0})).eval()
    x = torch.randint(0, 100, (2, 10))
    explained = torch._dynamo.explain(fast)(x)
    assert explained.graph_count <= 2 and explained.graph_break_count <= 1   # only around the disabled check
    compiled = torch.compile(fast, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), fast(x))
    with pytest.raises(ValueError, match="token ids must lie in"):
        compiled(torch.full((2, 10), 500))
    torch._dynamo.reset()


# ---------------------------------------------------------------- another device: meta tensors

@pytest.fixture
def meta_model(monkeypatch):
    "The tiny model on the meta device; its input check reads numbers back, which meta tensors cannot give."
    torch.manual_seed(0)
    model = GPTModel(TINY).to("meta")
    monkeypatch.setattr(model, "_check_input", lambda idx: None)
    return model


@pytest.mark.parametrize("sdpa", [True, False])
def test_forward_makes_no_tensor_off_the_inputs_device(meta_model, sdpa):
    meta_model.set_sdpa(sdpa)
    x = torch.zeros(2, 10, dtype=torch.long, device="meta")
    assert meta_model(x).device.type == "meta"


def test_fast_model_and_kv_cache_stay_on_the_models_device(meta_model, monkeypatch):
    x = torch.zeros(2, 10, dtype=torch.long, device="meta")
    fast = speed.make_fast(meta_model)
    monkeypatch.setattr(fast, "_check_input", lambda idx: None)
    assert fast(x).device.type == "meta" and fast.tok_emb.weight.device.type == "meta"
    meta_model.eval()
    cache = KVCache.for_model(meta_model, batch_size=2)
    assert cache.keys[0].device.type == "meta" and cache.keys[0].dtype == meta_model.tok_emb.weight.dtype
    assert cached_forward(meta_model, x[:, :6], cache).device.type == "meta"
    assert cached_forward(meta_model, x[:, 6:7], cache).shape == (2, 1, 100) and cache.length == 7


def test_kv_cache_made_before_the_model_moved_or_converted_is_refused():
    model = GPTModel(TINY).eval()
    ids = torch.zeros(1, 3, dtype=torch.long)
    elsewhere = KVCache(TINY["n_layers"], 1, TINY["n_heads"], TINY["emb_dim"] // TINY["n_heads"], 16, device="meta")
    with pytest.raises(KVCacheError, match="the cache is torch.float32 on meta but the model's weights are torch.float32 on cpu"):
        cached_forward(model, ids, elsewhere)
    stale = KVCache.for_model(model, batch_size=1)
    model.to(torch.bfloat16)
    with pytest.raises(KVCacheError, match="make the cache after moving or converting the model"):
        cached_forward(model, ids, stale)


def test_training_step_stays_on_the_models_device(meta_model, monkeypatch):
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())   # meta has no autocast
    x = torch.zeros(2, 10, dtype=torch.long)                 # a CPU batch, as a DataLoader yields it
    loss = calc_loss_batch(x, x, meta_model, "meta")         # moves the batch
    assert loss.device.type == "meta"
    loss = speed.train_step(meta_model, torch.optim.AdamW(meta_model.parameters(), lr=1e-3), x, x, "meta")
    assert loss.device.type == "meta" and meta_model.out_head.weight.grad.device.type == "meta"


def test_greedy_generate_without_cache_stays_on_the_models_device(meta_model):
    from llm_from_scratch.generate import generate
    meta_model.eval()
    out = generate(meta_model, torch.zeros(2, 4, dtype=torch.long, device="meta"), 3, 16, use_cache=False)
    assert out.shape == (2, 7) and out.device.type == "meta"


# ---------------------------------------------------------------- benchmarks/gpu_check.sh, where there is no GPU

def test_gpu_check_parses_and_stops_with_a_message_without_cuda(tmp_path):
    "The GPU script is never run here; it must at least parse, and say clearly that it needs CUDA."
    import os
    import subprocess
    import sys
    from pathlib import Path
    if torch.cuda.is_available():
        pytest.skip("a real GPU is here: run benchmarks/gpu_check.sh itself")
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=root).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": ""}
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "CUDA is not available here" in run.stdout + run.stderr
    assert "stopped after the preflight" in (tmp_path / "summary.txt").read_text()


def test_gpu_check_runs_notebook_cells_as_nbdev_test_would():
    "Magics become `pass`; cells flagged eval: false or with a tst_flag (settings.ini) are skipped."
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    src = "try:\n    import x\nexcept ImportError:\n    %pip install x\n!ls\ny = 1"
    assert gpu_check._runnable(src, {"slow"}) == "try:\n    import x\nexcept ImportError:\n    pass\npass\ny = 1"
    assert gpu_check._runnable("#| eval: false\nboom()", set()) is None
    assert gpu_check._runnable("#| slow\nboom()", {"slow"}) is None
    assert "slow" in gpu_check._skip_flags()
