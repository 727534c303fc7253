"""The training loop, in one piece: data, model, AdamW with a cosine schedule, gradient clipping,
validation each epoch, checkpoints (each epoch and every --save-every steps), exact resume, the
test metrics of the best epoch beside the task's baseline, metrics.json and curves.png. SIGINT and
SIGTERM stop it at the next step boundary with a checkpoint (see interrupt.py).

Exact resume: each epoch's example order comes from a generator seeded by (seed, epoch), the torch
RNG (dropout) is saved with the optimizer, and a checkpoint records the epoch and step to continue
from, so a resumed run computes the same steps as an uninterrupted one."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from .. import apply_constraints, regularization_loss
from . import TrainError, checkpoint, checks, distributed, report
from .interrupt import StopRequests, TrainingInterrupted
from .models import architecture
from . import precision
from .precision import Precision
from .tasks import COMMON, Task, get


def hyperparameters(task: Task, options: dict, quick: bool) -> dict:
    foreign = sorted(k for k, v in options.items() if v is not None and k not in task.options())
    if foreign:
        names = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise TrainError(f"{names}: not an option of the {task.name} task")
    hp = dict(COMMON, **task.defaults)
    if quick:
        hp.update(task.quick)
    hp.update({k: v for k, v in options.items() if v is not None})
    checks.check(hp)
    return hp


def epoch_order(hp: dict, epoch: int, size: int) -> list:
    """The batches (index tensors) of one epoch: a permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(hp["seed"] * 100003 + epoch)
    order = torch.randperm(size, generator=generator)
    if hp["steps_per_epoch"]:
        order = order[: hp["steps_per_epoch"] * hp["batch_size"]]
    return [order[i:i + hp["batch_size"]] for i in range(0, len(order), hp["batch_size"])]


def learning_rate(hp: dict, step: int, total: int) -> float:
    """Linear warm-up over the first 2% of steps, then a cosine decay to 10% of --lr."""
    warmup = max(1, int(0.02 * total))
    if step < warmup:
        return hp["lr"] * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return hp["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def summarize(task: Task, sums: dict) -> dict:
    sums = distributed.all_reduce_sums(sums)
    means = {name: float(total) / count for name, (total, count) in sums.items() if count}
    return task.finish(means) if means else {}


def add_sums(into: dict, sums: dict) -> None:
    for name, (total, count) in sums.items():
        old = into.get(name, (0.0, 0.0))
        into[name] = (old[0] + float(total), old[1] + count)


@torch.no_grad()
def evaluate(task: Task, model, data, split: str, hp: dict, rank: int = 0, world: int = 1) -> dict:
    """Metrics of `model` on a split (in the run's precision); each rank takes its share, the sums are
    added over ranks."""
    model.eval()
    sums: dict = {}
    size = data.size(split)
    device = next(model.parameters(), torch.empty(0)).device  # (a model without parameters: an ONNX graph, CPU)
    for start in range(rank * hp["eval_batch_size"], size, world * hp["eval_batch_size"]):
        index = torch.arange(start, min(start + hp["eval_batch_size"], size))
        with precision.autocast(hp.get("precision", "fp32"), device):
            add_sums(sums, task.step(model, data.batch(split, index))[1])
    return summarize(task, sums)


def score(task: Task, metrics: dict) -> list:
    """What picks the best epoch, larger is better: the headline metric, then the lower loss on ties."""
    sign = 1 if task.higher_is_better else -1
    return [sign * metrics[task.metric], -metrics["loss"]]


def better(new: list, old) -> bool:
    return old is None or new > old


def _progress(total: int, initial: int, description: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm(total=total, initial=initial, desc=description, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5, leave=False)


def train(options: dict, *, task_name: str | None = None, out: str | None = None, resume: str | None = None,
          quick: bool = False, progress: bool = True, save_every: int = 0, log=print, callback=None,
          _after_step=None) -> dict:
    """Train a task; returns the final metrics (also in OUT/metrics.json). `callback(model, rank)` runs
    at the end on every rank and `_after_step(steps done)` after each step (tests use them). Raises
    TrainingInterrupted after saving a checkpoint when SIGINT/SIGTERM arrive."""
    with StopRequests() as stop:
        return _train(options, task_name, out, resume, quick, progress, save_every, log, callback, _after_step, stop)


def _train(options, task_name, out, resume, quick, progress, save_every, log, callback, after_step, stop) -> dict:
    started = time.time()
    # ---- configuration: from the resumed checkpoint, or defaults < --quick < options
    if resume:
        run = Path(resume)
        folder = checkpoint.latest(run)
        saved = checkpoint.read_config(folder)
        task = get(saved["task"])
        hp = dict(saved["hp"])
        quick = bool(saved.get("quick"))  # a resumed --quick run is still one (runs saved before: not known)
        if options.get("epochs") is not None:
            hp["epochs"] = options["epochs"]
            checks.check(hp)
        different = {k: v for k, v in options.items()
                     if v is not None and k != "epochs" and k in hp and hp[k] != v}
        if different:
            raise TrainError(f"--resume {run}: the run was made with other options than {different}; "
                             f"resume with the run's own options (saved in its config.json)")
    else:
        task = get(task_name)
        hp = hyperparameters(task, options, quick)
        run = Path(out or f"runs/{task.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    checks.non_negative("save_every", save_every)
    device = checks.device(hp.get("device"))
    rank, world = distributed.setup(device)
    main = rank == 0

    # ---- data and model
    torch.manual_seed(hp["seed"])
    data = task.load(hp)
    model = task.model(hp, data.meta).to(device)
    config = {"task": task.name, "quick": quick, "hp": hp, "meta": data.meta, "data": data.info,
              "architecture": architecture(model)}
    if resume and saved.get("architecture") != config["architecture"]:
        raise TrainError(f"--resume {run}: its checkpoint is of another architecture than this task builds")
    # fused: one pass over each parameter (the default's per-op passes cost sentiment's embedding 5 ms a step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], fused=True)
    amp = Precision(hp.get("precision", "fp32"), device)  # (runs saved before --precision: fp32)
    state = {"epoch": 0, "step": 0, "history": [], "best": None, "best_epoch": None, "train_sums": {},
             "elapsed": 0.0}
    if resume:
        checkpoint.load_weights(folder, model)
        state.update(checkpoint.load_training_state(folder, optimizer))
        amp.load_state_dict(state.get("loss_scale", {}))
        state["train_sums"] = {k: tuple(v) for k, v in state["train_sums"].items()}
        log(f"resuming {run} at epoch {state['epoch'] + 1}, step {state['step']} (from {folder.name})")
    if main:
        run.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_temporaries(run)
        checkpoint.write_json_atomic(run / "config.json", config)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    if main and not resume:
        log(f"{task.name}: {json.dumps(data.info.get('sizes'))}; run folder {run}")

    def save(name: str, epoch: int, step: int, pointer_best: bool = False) -> Path:
        folder = run / "checkpoints" / name
        if not main:
            return folder
        s = dict(state, epoch=epoch, step=step, elapsed=state["elapsed"] + time.time() - started,
                 loss_scale=amp.state_dict())
        s["train_sums"] = {k: [float(v[0]), v[1]] for k, v in state["train_sums"].items()}
        checkpoint.save(folder, model, optimizer, config, s)
        checkpoint.write_pointer(run, "latest.json", folder)
        if pointer_best:
            checkpoint.write_pointer(run, "best.json", folder)
        keep = {name, _pointed(run, "best.json")}
        for old in (run / "checkpoints").iterdir():
            if old.name not in keep and not old.name.startswith("."):
                import shutil
                shutil.rmtree(old, ignore_errors=True)
        return folder

    # ---- the loop
    steps_per_epoch = len(epoch_order(hp, 0, data.size("train")))
    total_steps = hp["epochs"] * steps_per_epoch
    if quick and main:
        _smoke_run_notice(f"a --quick smoke run: {total_steps} steps, not a result; run without --quick for the "
                          f"real model")
    for epoch in range(state["epoch"], hp["epochs"]):
        data.prepare_epoch(hp, epoch)
        batches = epoch_order(hp, epoch, data.size("train"))
        bar = _progress(len(batches), state["step"], f"epoch {epoch + 1}/{hp['epochs']}", progress and main)
        tick, seen = time.time(), 0
        net.train()
        for step in range(state["step"], len(batches)):
            index = batches[step][rank::world]                      # this rank's shard of the batch
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(hp, epoch * steps_per_epoch + step, total_steps)
            with amp.autocast():
                loss, sums = task.step(net, data.batch("train", index))
            loss = loss + regularization_loss(model)
            optimizer.zero_grad(set_to_none=True)
            amp.backward(loss)
            if hp["clip"]:
                amp.unscale(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), hp["clip"])
            amp.step(optimizer)
            apply_constraints(model)
            add_sums(state["train_sums"], sums)
            seen += len(batches[step])
            if bar is not None:
                shown = {k: float(v[0]) / v[1] for k, v in sums.items()}
                bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()} | {
                    "ex/s": f"{seen / max(1e-9, time.time() - tick):.0f}"}, refresh=False)
                bar.update(1)
            if after_step is not None:
                after_step(epoch * steps_per_epoch + step + 1)
            if step + 1 < len(batches):  # the epoch's last step is saved with its validation, below
                name = f"epoch-{epoch + 1:03d}-step-{step + 1:05d}"
                saved = save(name, epoch, step + 1) if save_every and (step + 1) % save_every == 0 else None
                signum = stop.requested()
                if signum:
                    if bar is not None:
                        bar.close()
                    raise TrainingInterrupted(signum, run, saved or save(name, epoch, step + 1))
        if bar is not None:
            bar.close()
        train_metrics = summarize(task, state["train_sums"])
        val_metrics = evaluate(task, model, data, "val", hp, rank, world)
        is_best = better(score(task, val_metrics), state["best"])
        if is_best:
            state["best"], state["best_epoch"] = score(task, val_metrics), epoch + 1
        state["history"].append({"epoch": epoch + 1, "train": train_metrics, "val": val_metrics,
                                 "lr": optimizer.param_groups[0]["lr"],
                                 "seconds": round(time.time() - tick, 2)})
        state["train_sums"], state["step"] = {}, 0
        if main:
            log(f"epoch {epoch + 1}/{hp['epochs']}  " + "  ".join(
                [f"train {k} {v:.4f}" for k, v in train_metrics.items() if k in ("loss", task.metric)]
                + [f"val {k} {v:.4f}" for k, v in val_metrics.items() if k in ("loss", task.metric)]
                + [f"{time.time() - tick:.1f}s" + ("  (best)" if is_best else "")]))
        saved = save(f"epoch-{epoch + 1:03d}", epoch + 1, 0, pointer_best=is_best)
        distributed.barrier()
        signum = stop.requested()
        if signum:
            raise TrainingInterrupted(signum, run, saved)

    # ---- test the best epoch, beside the baseline
    best_folder = run / "checkpoints" / f"epoch-{state['best_epoch']:03d}" if state["best_epoch"] else None
    distributed.barrier()
    if best_folder is not None and best_folder.exists():
        checkpoint.load_weights(best_folder, model)
    test_metrics = evaluate(task, model, data, "test", hp, rank, world)
    final = {}
    if main:
        baseline = task.baseline(data, hp)
        final = {"task": task.name, "quick": quick, "target": task.target, "metric": task.metric,
                 "best_epoch": state["best_epoch"], "val": state["history"][-1]["val"] if state["history"] else {},
                 "best_val": state["history"][state["best_epoch"] - 1]["val"] if state["best_epoch"] else None,
                 "test": test_metrics, "baseline": baseline,
                 "epochs": state["history"], "hp": hp, "data": data.info, "world_size": world,
                 "parameters": sum(p.numel() for p in model.parameters()),
                 "wall_time_s": round(state["elapsed"] + time.time() - started, 2),
                 "checkpoint": str(best_folder) if best_folder else None}
        report.write_metrics(run, final)
        report.plot_curves(run, state["history"], task.metric, f"lstm train {task.name}")
        log(f"test ({'epoch ' + str(state['best_epoch'])}): " + "  ".join(
            f"{k} {v:.4f}" for k, v in test_metrics.items()) + f"   baseline: {json.dumps(baseline)}")
        log(f"wrote {run / 'metrics.json'}, {run / 'curves.png'}, checkpoints in {run / 'checkpoints'}")
        if quick:
            _smoke_run_notice(f"that was a --quick smoke run ({total_steps} steps): its numbers are not a result; "
                              f"run without --quick for the real model")
    if callback is not None:
        callback(model, rank)
    distributed.barrier()
    return final


def _smoke_run_notice(text: str) -> None:
    """On stderr, not through `log`: a --quick run's numbers must not be mistaken for a result even when
    the log (stdout) is redirected to a file."""
    print(f"lstm train: {text}", file=sys.stderr, flush=True)


def _pointed(run: Path, pointer: str):
    try:
        return Path(json.loads((run / pointer).read_text())["checkpoint"]).name
    except (OSError, ValueError, KeyError):
        return None
