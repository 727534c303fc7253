"""`lstm train|evaluate|predict|generate|export`: a --quick run per task, checkpoints, exact resume,
atomic writes, and clear errors for bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TALLY
from lstm.cli import main
from lstm.train import TrainError, checkpoint
from lstm.train.loop import train

SRC = str(Path(__file__).resolve().parents[1] / "src")


def finite(tree):
    if isinstance(tree, dict):
        return all(finite(v) for v in tree.values())
    if isinstance(tree, list):
        return all(finite(v) for v in tree)
    if isinstance(tree, float):
        return math.isfinite(tree)
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One --quick run per task, shared by the tests below."""
    root = tmp_path_factory.mktemp("runs")
    for task in ("sentiment", "charlm", "forecast", "vowels", "adding", "copy"):
        assert main(["train", task, "--quick", "--no-progress", "--out", str(root / task)]) == 0
    return root


@pytest.mark.parametrize("task,metric,baseline_key", [
    ("sentiment", "accuracy", "test_accuracy"), ("charlm", "loss", "test_loss"), ("forecast", "rmse", "test_rmse"),
    ("vowels", "accuracy", "test_accuracy"), ("adding", "mse", "test_mse"), ("copy", "accuracy", "test_accuracy")])
def test_quick_run_metrics(runs, task, metric, baseline_key):
    run = runs / task
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["metric"] == metric and metrics["quick"] is True
    assert metric in metrics["test"] and baseline_key in metrics["baseline"] and metrics["baseline"]["name"]
    assert len(metrics["epochs"]) == 2 and all(metric in e["val"] and "loss" in e["train"] for e in metrics["epochs"])
    assert finite(metrics) and metrics["wall_time_s"] > 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folder = checkpoint.resolve(run)
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json",
                                                  "config.json", "checksums.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["task"] == task and set(load_file(folder / "model.safetensors")) == set(config["architecture"])


def test_evaluate_predict_generate(runs, capsys):
    assert main(["evaluate", str(runs / "sentiment"), "--json", "--no-baseline"]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = json.loads((runs / "sentiment" / "metrics.json").read_text())
    assert result["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert main(["predict", str(runs / "sentiment"), "a moving, beautifully acted film", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label"] in ("fresh", "rotten") and 0.5 <= out["probability"] <= 1
    series = ",".join(str(20000 + 1000 * math.sin(i / 7.6)) for i in range(672))
    assert main(["predict", str(runs / "forecast"), series, "--json"]) == 0
    forecast = json.loads(capsys.readouterr().out)["forecast"]
    assert len(forecast) == 48 and all(math.isfinite(v) for v in forecast)
    assert main(["generate", str(runs / "charlm"), "--prompt", "ROMEO.", "--length", "40", "--temperature", "0.7"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO.")


def test_export_keras(runs, tmp_path, capsys):
    """`lstm export RUN --format keras`: Keras 3 loads the trained model and predicts what it does."""
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    from lstm.train.models import keras_model
    from lstm.train.restore import restore

    cases = {"sentiment": torch.tensor([[5, 17, 3, 9] + [0] * 76, [8] * 30 + [0] * 50]),
             "charlm": torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))}
    for task, x in cases.items():
        output = tmp_path / f"{task}.keras"
        assert main(["export", str(runs / task), "--format", "keras", "--output", str(output)]) == 0
        assert str(output) in capsys.readouterr().out
        theirs = keras.ops.convert_to_numpy(keras.saving.load_model(output)(x.numpy().astype("int32"), training=False))
        task_object, model, _, _ = restore(runs / task)
        ours = keras_model(model, task_object.name)(x).detach().numpy()
        assert theirs.shape == ours.shape and np.abs(theirs - ours).max() <= 1e-5 * max(1.0, np.abs(ours).max())
    assert main(["export", str(runs / "sentiment")]) == 0 and (runs / "sentiment" / "model.keras").exists()
    assert main(["export", str(runs / "forecast")]) == 2
    assert "no Keras equivalent" in capsys.readouterr().err


def test_export_onnx_and_predict_through_it(runs, tmp_path, capsys):
    """`lstm export RUN --format onnx [--state]`: ONNX Runtime predicts what the checkpoint does
    (`lstm predict RUN --onnx FILE`: sentiment, and vowels through the graph's mask input), and the
    character model exported with --state runs a text in two chunks, its state fed back, as the
    model does in one call."""
    ort = pytest.importorskip("onnxruntime")
    from lstm.train.restore import restore

    series = tmp_path / "series.csv"
    np.savetxt(series, np.random.default_rng(0).standard_normal((15, 12)), delimiter=",")
    for task, inputs in (("sentiment", ["a moving, beautifully acted film", "a dull mess"]), ("vowels", [str(series)])):
        output = tmp_path / f"{task}.onnx"
        assert main(["export", str(runs / task), "--format", "onnx", "--output", str(output)]) == 0
        graph_inputs = "inputs, mask" if task == "vowels" else "inputs"
        assert f"wrote {output} (ONNX opset 17; inputs {graph_inputs}; outputs outputs)" in capsys.readouterr().out
        assert main(["predict", str(runs / task), *inputs, "--json"]) == 0
        ours = json.loads(capsys.readouterr().out)
        assert main(["predict", str(runs / task), *inputs, "--json", "--onnx", str(output)]) == 0
        theirs = json.loads(capsys.readouterr().out)
        for a, b in zip(ours if isinstance(ours, list) else [ours], theirs if isinstance(theirs, list) else [theirs]):
            assert a["label"] == b["label"] and abs(a["probability"] - b["probability"]) <= 1e-5

    assert main(["export", str(runs / "charlm"), "--format", "onnx", "--state"]) == 0
    assert "inputs inputs, lstm/initial_h, lstm/initial_c; outputs outputs, lstm/h, lstm/c" in capsys.readouterr().out
    session = ort.InferenceSession(str(runs / "charlm" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(1, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    _, model, _, _ = restore(runs / "charlm")
    state = {f"lstm/initial_{s}": np.zeros((2, model.lstm.units), np.float32) for s in "hc"}
    chunks = []
    for part in (ids[:, :5], ids[:, 5:]):
        logits, h, c = session.run(None, {"inputs": part.numpy(), **state})
        chunks.append(logits)
        state = {"lstm/initial_h": h, "lstm/initial_c": c}
    with torch.no_grad():
        expected = model(ids)[0].numpy()
    assert np.abs(np.concatenate(chunks, axis=1) - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())

    assert main(["export", str(runs / "sentiment"), "--format", "onnx"]) == 0
    assert (runs / "sentiment" / "model.onnx").exists()
    assert main(["export", str(runs / "forecast"), "--format", "onnx"]) == 2
    assert "the forecast model (Forecaster) has no ONNX equivalent" in capsys.readouterr().err
    assert main(["export", str(runs / "sentiment"), "--state"]) == 2
    assert "--state: only for --format onnx" in capsys.readouterr().err
    assert main(["predict", str(runs / "vowels"), str(series), "--onnx", str(tmp_path / "sentiment.onnx")]) == 2
    assert "the graph has no `mask` input" in capsys.readouterr().err
    assert main(["predict", str(runs / "sentiment"), "fine", "--onnx", str(tmp_path / "none.onnx")]) == 2
    assert f"--onnx {tmp_path / 'none.onnx'}: no such file" in capsys.readouterr().err


def test_export_int8_and_evaluate_through_onnx_runtime(runs, capsys):
    """`lstm export RUN --format onnx --int8` and `lstm evaluate RUN --onnx FILE`: the float32 graph
    measures what the checkpoint does (sentiment; charlm, whose model returns its state too), the
    int8 one within quantization's error of it."""
    pytest.importorskip("onnxruntime")
    for task, metric, int8_tolerance in (("sentiment", "loss", 0.02), ("charlm", "loss", 0.02)):
        assert main(["evaluate", str(runs / task), "--split", "test", "--no-baseline", "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)["test"][metric]
        for flags, name, tolerance in (([], "model.onnx", 1e-5), (["--int8"], "model-int8.onnx", int8_tolerance)):
            assert main(["export", str(runs / task), "--format", "onnx", *flags]) == 0
            assert f"model{'-int8' if flags else ''}.onnx (ONNX opset 17{', int8' if flags else ''};" in \
                capsys.readouterr().out
            assert main(["evaluate", str(runs / task), "--split", "test", "--no-baseline", "--json", "--onnx",
                         str(runs / task / name)]) == 0
            got = json.loads(capsys.readouterr().out)["test"][metric]
            assert abs(got - expected) <= tolerance * max(1.0, abs(expected)), (task, name, got, expected)
    assert main(["export", str(runs / "sentiment"), "--int8"]) == 2
    assert "--int8: only for --format onnx" in capsys.readouterr().err


def tiny(**extra):
    return dict({"epochs": 2, "steps_per_epoch": 4, "batch_size": 16, "units": 8}, **extra)


def final_weights(run):
    return load_file(checkpoint.latest(run) / "model.safetensors")


def crash_after(steps):
    """An `_after_step` hook that kills the run (as SIGKILL would, no checkpoint) after `steps` steps."""
    def hook(done):
        if done >= steps:
            raise KeyboardInterrupt("simulated crash")
    return hook


def test_resume_continues_exactly(tmp_path):
    logs = []
    whole = train(tiny(), task_name="vowels", out=str(tmp_path / "whole"), progress=False, log=logs.append)
    with pytest.raises(KeyboardInterrupt):  # killed after step 3 of epoch 1; checkpoint at step 2
        train(tiny(), task_name="vowels", out=str(tmp_path / "cut"), progress=False, log=logs.append,
              save_every=2, _after_step=crash_after(3))
    assert checkpoint.latest(tmp_path / "cut").name == "epoch-001-step-00002"
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["epochs"][-1]["val"] == whole["epochs"][-1]["val"] and resumed["test"] == whole["test"]
    assert [e["train"] for e in resumed["epochs"]] == [e["train"] for e in whole["epochs"]]


def test_resume_after_epoch_and_extend(tmp_path):
    train(tiny(epochs=1), task_name="adding", out=str(tmp_path / "a"), progress=False, log=lambda *_: None)
    assert main(["train", "--resume", str(tmp_path / "a"), "--epochs", "2", "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "a" / "metrics.json").read_text())["epochs"]) == 2


def test_crash_during_checkpoint_write_keeps_previous(tmp_path):
    run = tmp_path / "run"
    train(tiny(epochs=1), task_name="adding", out=str(run), progress=False, log=lambda *_: None)
    folder = checkpoint.latest(run)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    from lstm.train.restore import restore

    task, model, hp, _ = restore(run)
    optimizer = torch.optim.AdamW(model.parameters())

    def crash(stage):
        if stage == "files":
            raise KeyboardInterrupt("killed while writing")

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(folder, model, optimizer, json.loads((folder / "config.json").read_text()), {},
                        write_hook=crash)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]
    restore(run)  # still loads


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lstm.cli", *args], capture_output=True, text=True,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=120)


def test_no_command_names_the_commands(capsys):
    assert main([]) == 2
    error = capsys.readouterr().err
    assert "COMMAND: expected one of demo, bench, train" in error and "got none" in error


def test_bad_input_clear_messages(runs, tmp_path):
    done = run_cli("train", "nosuchtask")
    assert done.returncode == 2 and done.stderr == ("lstm train: error: unknown task 'nosuchtask'; the tasks are "
                                                    "sentiment, charlm, forecast, vowels, adding, copy\n")
    done = run_cli("train", "sentiment", "--no-such-option")
    assert done.returncode == 2 and "unrecognized arguments: --no-such-option" in done.stderr
    done = run_cli("train", "sentiment", "--delay", "5")
    assert done.returncode == 2 and "--delay: not an option of the sentiment task" in done.stderr
    done = run_cli("evaluate", str(tmp_path / "missing"))
    assert done.returncode == 2 and "no such file or folder" in done.stderr and "Traceback" not in done.stderr


def test_bad_checkpoints_and_inputs(runs, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoint.resolve(runs / "sentiment"), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert main(["evaluate", str(corrupt)]) == 2
    assert "corrupt" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(checkpoint.resolve(runs / "sentiment"), other)
    shutil.copy(checkpoint.resolve(runs / "vowels") / "model.safetensors", other / "model.safetensors")
    assert main(["predict", str(other), "fine"]) == 2
    assert "model.safetensors does not match its checksum" in capsys.readouterr().err
    (other / "checksums.json").unlink()  # as a checkpoint from before checksums: loaded unchecked
    assert main(["predict", str(other), "fine"]) == 2
    assert "another architecture" in capsys.readouterr().err
    assert main(["predict", str(runs / "sentiment"), "   "]) == 2
    assert "text is empty" in capsys.readouterr().err
    assert main(["generate", str(runs / "sentiment"), "--prompt", "x"]) == 2
    assert "needs a charlm checkpoint" in capsys.readouterr().err
    (corrupt / "config.json").write_text("{not json")
    assert main(["evaluate", str(corrupt)]) == 2
    assert "config.json does not match its checksum" in capsys.readouterr().err
    (corrupt / "checksums.json").unlink()
    assert main(["evaluate", str(corrupt)]) == 2
    assert "config.json is corrupt" in capsys.readouterr().err


def test_bad_input_in_process(runs, tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("text,label\nfine,1\n")
    assert main(["train", "sentiment", "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "needs at least 10" in capsys.readouterr().err
    assert main(["train", "forecast", "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "no column 'value'" in capsys.readouterr().err
    with pytest.raises(TrainError, match="another architecture"):
        _resume_other_architecture(runs, tmp_path)


def _resume_other_architecture(runs, tmp_path):
    run = tmp_path / "arch"
    shutil.copytree(runs / "adding", run)
    folder = checkpoint.latest(run)
    saved = json.loads((folder / "config.json").read_text())
    saved["hp"]["units"] = 12  # the config now builds another model than the weights hold
    (folder / "config.json").write_text(json.dumps(saved))
    # as a checkpoint from before checksums, else the edit is refused as corruption before the architecture check
    (folder / "checksums.json").unlink()
    (run / "latest.json").write_text(json.dumps({"checkpoint": f"checkpoints/{folder.name}"}))
    train({}, resume=str(run), progress=False, log=lambda *_: None)


def test_user_data(tmp_path):
    rows = ["text,label"] + [f"{'good great fun' if i % 2 else 'bad dull boring'} {i},{'pos' if i % 2 else 'neg'}"
                             for i in range(60)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    assert main(["train", "sentiment", "--quick", "--no-progress", "--data", str(tmp_path / "t.csv"),
                 "--out", str(tmp_path / "t")]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["data"]["source"] == str(tmp_path / "t.csv") and "test_accuracy" in metrics["baseline"]
    (tmp_path / "s.csv").write_text("value\n" + "\n".join(str(10 + math.sin(i / 3)) for i in range(400)))
    assert main(["train", "forecast", "--quick", "--no-progress", "--data", str(tmp_path / "s.csv"), "--season", "24",
                 "--horizon", "6", "--out", str(tmp_path / "f")]) == 0
    assert "test_rmse" in json.loads((tmp_path / "f" / "metrics.json").read_text())["baseline"]
    (tmp_path / "x.txt").write_text("to be or not to be, that is the question.\n" * 200)
    assert main(["train", "charlm", "--quick", "--no-progress", "--data", str(tmp_path / "x.txt"),
                 "--out", str(tmp_path / "c")]) == 0


# ----- a new user's first hour: what to train, smoke runs, models to distrust, several inputs ------
def test_train_without_a_task_lists_the_tasks_and_how_to_start(capsys):
    from lstm.train.tasks import TASKS

    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lstm train: error: give a TASK to train (or --resume RUN to continue a run); the tasks:\n")
    for name, task in TASKS.items():
        assert f"  {name:<10} {task.help}\n" in err
    assert "To start: `lstm train sentiment` (add --quick for a smoke run under a minute)" in err
    assert "usage:" not in err


def test_mistyped_task_names_the_closest_and_the_tasks(capsys):
    assert main(["train", "sentimnt", "--quick"]) == 2
    assert capsys.readouterr().err == ("lstm train: error: unknown task 'sentimnt' (did you mean sentiment?); the "
                                       "tasks are sentiment, charlm, forecast, vowels, adding, copy\n")


def test_quick_run_says_it_is_a_smoke_run_at_start_and_end(tmp_path, capsys):
    assert main(["train", "adding", "--quick", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "q")]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "--quick" in line]
    assert notices == [
        "lstm train: a --quick smoke run: 10 steps, not a result; run without --quick for the real model",
        "lstm train: that was a --quick smoke run (10 steps): its numbers are not a result; run without --quick "
        "for the real model"]
    assert json.loads((tmp_path / "q" / "metrics.json").read_text())["quick"] is True


def _as_full_run(runs, task, tmp_path, test_metric):
    """A copy of the --quick run of `task` as a run made without --quick (its checkpoint config says so,
    loaded unchecked as from before checksums) whose metrics.json reports `test_metric(baseline's)`."""
    run = tmp_path / task
    shutil.copytree(runs / task, run)
    folder = checkpoint.resolve(run)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, quick=False)))
    (folder / "checksums.json").unlink()
    for pointer in ("best.json", "latest.json"):
        (run / pointer).write_text(json.dumps({"checkpoint": f"checkpoints/{folder.name}"}))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["test"][metrics["metric"]] = test_metric(metrics["baseline"][f"test_{metrics['metric']}"])
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run, metrics


@pytest.mark.parametrize("task,worse,better", [("sentiment", lambda b: b, lambda b: b + 0.01),  # accuracy: higher
                                               ("forecast", lambda b: b * 1.1, lambda b: b * 0.9)])  # rmse: lower
def test_predict_warns_about_a_model_no_better_than_its_baseline(runs, tmp_path, capsys, task, worse, better):
    given = "a moving, beautifully acted film" if task == "sentiment" else ",".join(["20000"] * 672)
    run, metrics = _as_full_run(runs, task, tmp_path, worse)
    assert main(["predict", str(run), given]) == 0
    metric, baseline = metrics["metric"], metrics["baseline"]
    assert capsys.readouterr().err == (
        f"lstm predict: warning: the model of {run} is no better than its baseline (test {metric} "
        f"{metrics['test'][metric]:.4f}, baseline {baseline[f'test_{metric}']:.4f}: {baseline['name']}); its "
        f"answers are worth no more than the baseline's\n")
    _as_full_run(runs, task, tmp_path / "better", better)
    assert main(["predict", str(tmp_path / "better" / task), given]) == 0
    assert capsys.readouterr().err == ""


def test_predict_and_generate_warn_about_a_quick_run(runs, capsys):
    assert main(["predict", str(runs / "sentiment"), "a fine film"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"lstm predict: warning: {runs / 'sentiment'} is a --quick smoke run")
    assert err.endswith("; train without --quick for the real model\n") and len(err.splitlines()) == 1
    assert main(["generate", str(runs / "charlm"), "--length", "5"]) == 0
    metrics = json.loads((runs / "charlm" / "metrics.json").read_text())
    assert (f"is a --quick smoke run and no better than its baseline (test loss {metrics['test']['loss']:.4f}, "
            f"baseline {metrics['baseline']['test_loss']:.4f}: character bigram (add-one))") in capsys.readouterr().err


def test_predict_several_inputs_a_file_and_none(runs, tmp_path, capsys):
    run = str(runs / "sentiment")
    assert main(["predict", run, "a moving, beautifully acted film", "a dull mess", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in results] == ["a moving, beautifully acted film", "a dull mess"]
    assert main(["predict", run, "a moving film", "a dull mess"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(" (probability " in line for line in lines)
    (tmp_path / "inputs.txt").write_text("a moving film\n\n   \na dull mess\n")
    assert main(["predict", run, "--file", str(tmp_path / "inputs.txt"), "--json"]) == 0
    assert [r["text"] for r in json.loads(capsys.readouterr().out)] == ["a moving film", "a dull mess"]
    (tmp_path / "blank.txt").write_text("\n  \n")
    for argv, message in [
            (["--file", str(tmp_path / "blank.txt")],
             f"--file {tmp_path / 'blank.txt'}: no input in it (expected one input per line; blank lines are "
             f"skipped)"),
            (["--file", str(tmp_path / "none.txt")], f"--file {tmp_path / 'none.txt'}: no such file"),
            (["fine", "--file", str(tmp_path / "inputs.txt")], "not both (got 1 on the command line)"),
            ([], "lstm predict: error: INPUT: none given; give one or more (a sentence; numbers or a CSV file for "
                 "series tasks), or --file PATH with one per line")]:
        assert main(["predict", run, *argv]) == 2
        assert message in capsys.readouterr().err


def test_predict_on_a_charlm_run_points_to_generate(runs, capsys):
    assert main(["predict", str(runs / "charlm"), "ROMEO."]) == 2
    assert capsys.readouterr().err == (
        f"lstm predict: error: {runs / 'charlm'} is a charlm run: a character model writes text rather than "
        f"labelling it; use `lstm generate {runs / 'charlm'} --prompt ROMEO.`\n")
    assert main(["predict", str(runs / "adding"), "1 2"]) == 2
    assert "`lstm evaluate RUN` measures the model" in capsys.readouterr().err


# ----- long sequences: --bptt and --recompute ------------------------------------------------------
def test_bptt_and_recompute_keep_the_numbers_when_they_cut_nothing(runs, tmp_path):
    """--bptt as long as the sequence and a recomputing backward give the run's own numbers."""
    out = tmp_path / "long"
    assert main(["train", "adding", "--quick", "--no-progress", "--bptt", "20", "--recompute", "5",
                 "--out", str(out)]) == 0
    plain = json.loads((runs / "adding" / "metrics.json").read_text())
    long = json.loads((out / "metrics.json").read_text())
    assert long["hp"]["bptt"] == 20 and long["hp"]["recompute"] == 5
    assert long["test"]["mse"] == pytest.approx(plain["test"]["mse"], rel=1e-5)
    assert [e["train"]["mse"] for e in long["epochs"]] == pytest.approx([e["train"]["mse"] for e in plain["epochs"]],
                                                                        rel=1e-5)


def test_long_sequence_models_equal_the_plain_ones():
    """Each task model with --bptt / --recompute: the same weights (names and shapes: checkpoints do not
    depend on the options) and, where the options cut nothing, the same gradients."""
    from lstm.train import models

    hp = {"units": 8, "embedding": 4, "dropout": 0.0, "season": 24, "horizon": 6, "read": 12, "ar": 4, "day": 3}
    builders = {"charlm": (lambda hp: models.CharLM(11, hp), torch.randint(0, 11, (3, 16))),
                "forecast": (models.Forecaster, torch.randn(3, 48)),
                "adding": (lambda hp: models.sequence_regressor(2, 1, hp), torch.randn(3, 16, 2))}
    for name, (build, x) in builders.items():
        torch.manual_seed(0)
        plain = build(dict(hp))
        with torch.no_grad():  # (the forecaster's output starts at zeros: no gradient would reach its LSTM)
            for p in plain.parameters():
                p.normal_(0, 0.5)
        long = build(dict(hp, bptt=16, recompute=4))
        assert models.architecture(long) == models.architecture(plain)
        long.load_state_dict(plain.state_dict())
        grads = []
        for model in (plain, long):
            out = model(x)
            loss = (out[0] if isinstance(out, tuple) else out).square().sum()
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads)), name
        truncated = build(dict(hp, bptt=4))
        truncated.load_state_dict(plain.state_dict())
        out = truncated(x)
        cut = torch.autograd.grad((out[0] if isinstance(out, tuple) else out).square().sum(),
                                  list(truncated.parameters()))
        assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], cut)), name  # gradients were cut


# ----- impossible options ---------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["adding", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["adding", "--batch-size", "-4"], "--batch-size: expected a positive integer, got -4"),
    (["adding", "--lr", "nan"], "--lr: expected a positive number, got nan"),
    (["adding", "--lr", "-1"], "--lr: expected a positive number, got -1.0"),
    (["adding", "--weight-decay", "-1"], "--weight-decay: expected a non-negative number, got -1.0"),
    (["adding", "--units", "0"], "--units: expected a positive integer, got 0"),
    (["adding", "--length", "1"], "--length: expected an integer >= 2, got 1"),
    (["adding", "--steps-per-epoch", "-1"], "--steps-per-epoch: expected a non-negative integer, got -1"),
    (["adding", "--save-every", "-1"], "--save-every: expected a non-negative integer, got -1"),
    (["copy", "--delay", "-1"], "--delay: expected a non-negative integer, got -1"),
    (["charlm", "--seq-len", "0"], "--seq-len: expected a positive integer, got 0"),
    (["vowels", "--maxlen", "0"], "--maxlen: expected a positive integer, got 0"),
    (["vowels", "--dropout", "1.5"], "--dropout: expected a number in [0, 1), got 1.5"),
    (["forecast", "--season", "0"], "--season: expected a positive integer, got 0"),
    (["forecast", "--read", "-5"], "--read: expected a non-negative integer, got -5"),
    (["adding", "--device", "banana"], "--device: expected cpu or cuda (cuda:N), got 'banana'"),
    (["adding", "--bptt", "-1"], "--bptt: expected a non-negative integer, got -1"),
    (["adding", "--recompute", "-3"], "--recompute: expected a non-negative integer, got -3"),
    (["adding", "--bptt", "6", "--recompute", "4"], "--recompute: expected a divisor of --bptt 6, got 4"),
    (["sentiment", "--bptt", "5"], "--bptt: not an option of the sentiment task"),
    (["vowels", "--recompute", "5"], "--recompute: not an option of the vowels task"),
])
def test_impossible_options(tmp_path, capsys, args, message):
    TALLY["bad input"] += 1
    assert main(["train", *args, "--quick", "--no-progress", "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
