"""Appendix E: train_model under torchrun with 2 CPU processes (gloo, 127.0.0.1 only) equals one process.

The test launches `python -m torch.distributed.run` on this file; each worker trains a tiny model with
train_model and writes its results to a folder, which the test compares with a single-process run.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

CFG = {"vocab_size": 97, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}
EPOCHS, GLOBAL_BATCH = 2, 4


def _loaders():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG["vocab_size"], (16, CFG["context_length"] + 1), generator=g)
    train = DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=GLOBAL_BATCH, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(ids[:4, :-1], ids[:4, 1:]), batch_size=2, shuffle=False)
    return train, val


def _train(drop_rate=0.0, **kw):
    from llm_from_scratch.core import set_seed
    from llm_from_scratch.model import GPTModel
    from llm_from_scratch.train import train_model
    set_seed(123)
    model = GPTModel({**CFG, "drop_rate": drop_rate})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    train, val = _loaders()
    hist = train_model(model, train, val, opt, "cpu", EPOCHS, eval_freq=3, eval_iter=2, progress=False, **kw)
    return hist, model


def _worker(out: Path) -> None:
    "Runs in each torchrun process."
    import llm_from_scratch.train as train_mod
    from llm_from_scratch.speed import cleanup_distributed, get_rank, get_world_size, setup_distributed
    setup_distributed()
    rank, writes = get_rank(), []
    real_save = train_mod.save_checkpoint
    train_mod.save_checkpoint = lambda path, *a, **k: (writes.append(str(path)), real_save(path, *a, **k))[1]
    try:
        hist, model = _train(checkpoint_path=out / "full.pth")                        # no dropout: equals 1 process
        full_d, _ = _train(drop_rate=0.1)                                              # with dropout, uninterrupted
        _train(drop_rate=0.1, checkpoint_path=out / "cut.pth", checkpoint_every=3, max_steps=5)   # "crash"
        resumed, _ = _train(drop_rate=0.1, resume_from=out / "cut.pth")
        result = {"world": get_world_size(), "writes": writes, "step_losses": hist.step_losses,
                  "val_losses": hist.val_losses, "tokens": hist.track_tokens_seen,
                  "dropout_full": full_d.step_losses, "dropout_resumed": resumed.step_losses}
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        torch.save(model.state_dict(), out / f"weights{rank}.pt")
    finally:
        cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2
    # rank 0 alone wrote checkpoints (one at the end of the full run; steps 3 of the cut run)
    assert r0["writes"] and all(Path(w).name in ("full.pth", "cut.pth") for w in r0["writes"])
    assert r1["writes"] == []
    # every rank records the same history: the global batch's loss
    assert r0["step_losses"] == r1["step_losses"] and r0["val_losses"] == r1["val_losses"]

    single, model = _train()                                                   # one process, batch 4
    assert r0["tokens"] == single.track_tokens_seen
    torch.testing.assert_close(torch.tensor(r0["step_losses"]), torch.tensor(single.step_losses), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r0["val_losses"]), torch.tensor(single.val_losses), rtol=1e-5, atol=1e-5)
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"weights{rank}.pt", weights_only=True)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5)
    saved = torch.load(tmp_path / "full.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in saved["model_state_dict"])   # the book's keys, no DDP prefix
    assert len(saved["extra"]["train_state"]["rank_rng_states"]) == 2
    # resuming under DDP (with dropout, each rank its own generator) repeats the uninterrupted run
    assert r0["dropout_resumed"] == r0["dropout_full"] and r1["dropout_resumed"] == r1["dropout_full"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
