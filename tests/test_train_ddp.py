"""`lstm train` under DistributedDataParallel: two CPU processes (gloo), each on its shard; after a
step both ranks hold identical weights, and only rank 0 writes metrics and checkpoints."""

import json
import os
import shutil
import socket

import torch
from safetensors.torch import load_file, save_file
from two_ranks import spawn_two_ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from lstm.train import checkpoint, distributed, loop, report

    writes = []
    real_save, real_metrics = checkpoint.save, report.write_metrics
    checkpoint.save = lambda *a, **k: (writes.append("checkpoint"), real_save(*a, **k))[1]
    report.write_metrics = lambda *a, **k: (writes.append("metrics"), real_metrics(*a, **k))[1]

    def done(model, rank):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
        with open(f"{out}/writes{rank}.json", "w") as handle:
            json.dump(writes, handle)

    # one step; each rank computes gradients on its own half of the batch, DDP averages them
    options = {"epochs": 1, "steps_per_epoch": 1, "batch_size": 8, "subset": 64, "units": 8, "embedding": 8}
    loop.train(options, task_name="sentiment", out=f"{out}/run", progress=False, log=lambda *_: None,
               callback=done)
    distributed.cleanup()


def test_two_ranks_hold_identical_weights(tmp_path):
    def fresh_run(attempt: int) -> tuple:
        shutil.rmtree(tmp_path / "run", ignore_errors=True)  # (a stalled attempt's partial run)
        return 2, _free_port(), str(tmp_path)

    spawn_two_ranks(_worker, fresh_run, seconds=150)
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(tmp_path / "run" / "checkpoints" / "epoch-001" / "model.safetensors")
    assert all(torch.equal(saved[k], a[k]) for k in a)
    assert json.loads((tmp_path / "writes1.json").read_text()) == []
    assert sorted(set(json.loads((tmp_path / "writes0.json").read_text()))) == ["checkpoint", "metrics"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["task"] == "sentiment"


def _sums_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from lstm.train import distributed

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        # rank 1 had no batch of this split (a split smaller than world x eval batch size)
        first = distributed.all_reduce_sums({"loss": (torch.tensor(3.0), 2.0), "accuracy": (1.0, 2.0)} if rank == 0
                                            else {})
        second = distributed.all_reduce_sums({"loss": (torch.tensor(1.0), 1.0)})  # the next collective
        with open(f"{out}/sums{rank}.json", "w") as handle:
            json.dump([{k: [float(v[0]), v[1]] for k, v in s.items()} for s in (first, second)], handle)
        dist.barrier()  # both ranks done before the teardown (gloo's can hang otherwise: pytorch#75097)
    finally:
        dist.destroy_process_group()


def test_sums_add_over_ranks_when_one_rank_has_none(tmp_path):
    spawn_two_ranks(_sums_worker, lambda attempt: (str(tmp_path / f"init{attempt}"), str(tmp_path)), seconds=120)
    expected = [{"accuracy": [1.0, 2.0], "loss": [3.0, 2.0]}, {"loss": [2.0, 2.0]}]
    for rank in range(2):
        assert json.loads((tmp_path / f"sums{rank}.json").read_text()) == expected
