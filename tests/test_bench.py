"""`lstm bench` in a tiny mode: it runs, checks, and writes the JSON / Markdown it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lstm import cli
from lstm.commands import (bench_cases as cases, bench_cells, bench_int8, bench_lengths, bench_precision,
                           bench_variants)


def test_bench_tiny_run_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--quick", "--shapes", "2,5,3,4", "3,4,5,6", "--repeats", "1", "--no-memory",
                     "--stream-units", "4", "--variant-shape", "2,5,3,6", "--lengths-shape", "5,9,3,4",
                     "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out

    assert report["machine"]["threads"] == 2 and report["machine"]["torch"]
    assert report["machine"]["cpu_model"] and report["machine"]["date"]
    assert set(report["default_kernel"]) == {"2,5,3,4", "3,4,5,6"}

    onnx_ok = cases.onnx_status() is None
    for mode in ("forward", "train"):
        for shape in ([2, 5, 3, 4], [3, 4, 5, 6]):
            rows = {r["contender"]: r for r in report["results"] if r["mode"] == mode and r["shape"] == shape}
            assert set(rows) == set(cases.SEQUENCE_CONTENDERS)
            expected_ok = {cases.LSTM_DEFAULT, cases.LSTM_REFERENCE, cases.BASELINE, cases.TORCH_LOOP}
            if onnx_ok and mode == "forward":
                expected_ok.add(cases.ONNX)
            for name, row in rows.items():
                if name in expected_ok:
                    assert row["status"] == "ok", row
                    assert row["min_s"] > 0 and row["median_s"] >= row["min_s"] and row["samples_s"]
                    assert row["speedup_vs_baseline"] > 0
                else:
                    assert row["status"].startswith("n/a"), row
            assert rows[cases.BASELINE]["speedup_vs_baseline"] == pytest.approx(1.0)

    stream = {r["contender"]: r for r in report["results"] if r["mode"] == "stream"}
    assert set(stream) == set(cases.STREAM_CONTENDERS)
    for name, row in stream.items():
        if name == cases.STREAM_LSTM and row["status"] != "ok":
            assert row["status"].startswith("n/a")  # the streaming API may not exist yet
            continue
        assert row["status"] == "ok" and row["min_s"] > 0, row

    for check in report["correctness"]:  # (the bfloat16 and int8 rows within their tolerances)
        low = {bench_precision.ours_name(cell) for cell in bench_precision.CELLS}
        bound = (bench_precision.TOLERANCE if check["contender"] in low
                 else bench_int8.TOLERANCE if check["contender"] in (bench_int8.OURS, bench_int8.STREAM_OURS) else 1e-4)
        assert check.get("max_abs_diff_forward", 0) <= bound, check

    for title in ("Inference forward", "Training step", "Streaming, batch 1"):
        assert title in table
    for name in cases.SEQUENCE_CONTENDERS + cases.STREAM_CONTENDERS:
        assert name in table
    variants = {r["variant"]: r for r in report["variants"]["rows"]}
    assert set(variants) == set(bench_variants.VARIANTS) and report["variants"]["shape"] == [2, 5, 3, 6]
    for row in variants.values():
        assert row["fused_min_s"] > 0 and row["loop_min_s"] > 0
        assert row["vs_plain_min"] == pytest.approx(row["fused_min_s"] / row["plain_min_s"])
        assert row["vs_plain"] > 0
    assert variants["proj_size"]["speedup_vs_torch"] > 0
    assert "LSTM variants" in table and "layer_norm" in table
    markdown = (tmp_path / "bench.md").read_text()
    assert "| shape (B,T,D,H) | contender |" in markdown and "| 2,5,3,4 | torch.nn.LSTM |" in markdown

    bf16 = {(r["mode"], tuple(r["shape"]), r["contender"]): r for r in report["bf16"]}
    for cell in bench_precision.CELLS:
        for mode in ("forward", "train"):
            for shape in ((2, 5, 3, 4), (3, 4, 5, 6)):
                base = bf16[mode, shape, bench_precision.torch_name(cell)]
                for name in (bench_precision.ours_name(cell), bench_precision.torch_name(cell, "autocast"),
                             bench_precision.ours_name(cell, "fp32")):
                    row = bf16[mode, shape, name]
                    if name == bench_precision.torch_name(cell, "autocast") and row["status"].startswith(
                            "n/a (torch raises"):  # (oneDNN has no bf16 LSTM under autocast on some CPUs)
                        continue
                    assert row["status"] == "ok" and row["speedup_vs_baseline_min"] == pytest.approx(
                        base["min_s"] / row["min_s"])
    assert "bfloat16: min ms per call" in table

    cells = {(r["mode"], tuple(r["shape"]), r["contender"]): r for r in report["cells"]}
    for cell in bench_cells.CELLS:
        for mode in ("forward", "train"):
            for shape in ((2, 5, 3, 4), (3, 4, 5, 6)):
                ours = cells[mode, shape, bench_cells.ours_name(cell)]
                theirs = cells[mode, shape, bench_cells.torch_name(cell)]
                assert ours["status"] == theirs["status"] == "ok" and ours["min_s"] > 0
                assert ours["speedup_vs_baseline_min"] == pytest.approx(theirs["min_s"] / ours["min_s"])
        checked = [c for c in report["correctness"] if c["contender"] == bench_cells.ours_name(cell)]
        assert len(checked) == 2 and all(c["max_abs_diff_forward"] <= 1e-4 and c["max_rel_diff_grad_x"] <= 1e-4
                                         for c in checked)
    assert "GRU and SimpleRNN" in table and "| train | 2,5,3,4 | lstm GRU |" in markdown

    int8 = {(tuple(r["shape"]), r["contender"]): r for r in report["int8"]}
    for shape in ((2, 5, 3, 4), (3, 4, 5, 6)):
        for ours, base, others in ((bench_int8.OURS, bench_int8.BASELINE, [bench_int8.ORT_INT8]),
                                   (bench_int8.STREAM_OURS, bench_int8.STREAM_BASELINE, [])):
            row, base_row = int8[shape, ours], int8[shape, base]
            assert row["mode"] == "forward" and row["status"] == base_row["status"] == "ok"
            assert row["speedup_vs_baseline_min"] == pytest.approx(base_row["min_s"] / row["min_s"])
            for name in others:  # (ORT's, where onnxruntime is installed)
                assert int8[shape, name]["status"] == ("ok" if onnx_ok else int8[shape, name]["status"])
    assert {r["mode"] for r in report["int8"]} == {"forward"} and "int8 inference" in table

    ragged = {(r["mode"], r["contender"]): r for r in report["lengths"]}
    for mode in ("forward", "train"):
        base = ragged[mode, bench_lengths.BASELINE]
        for name in (bench_lengths.OURS, bench_lengths.PADDED, bench_lengths.TORCH_PACKED, bench_lengths.FULL):
            row = ragged[mode, name]
            assert row["shape"] == [5, 9, 3, 4] and row["status"] == "ok"
            assert row["speedup_vs_baseline_min"] == pytest.approx(base["min_s"] / row["min_s"])
    checked = [c for c in report["correctness"] if c["contender"] == bench_lengths.OURS]
    assert len(checked) == 1 and checked[0]["max_abs_diff_forward"] <= 1e-4 and checked[0]["max_abs_diff_grad_x"] <= 1e-4
    assert "Ragged batch" in table and "| train | 5,9,3,4 | lstm LSTM lengths |" in markdown


def test_bench_lengths_are_drawn_like_the_sentiment_sentences():
    lengths = bench_lengths.sentence_lengths(20000, 80, seed=0).double()
    assert 18 <= lengths.mean() <= 19 and 17 <= lengths.median() <= 19
    assert 37 <= lengths.quantile(0.99) <= 43 and lengths.min() >= 1 and lengths.max() <= 80


def test_variant_ratio_pairs_each_round_with_the_baselines_sample_of_that_round():
    # the baseline alone caught a fast moment in round 0: the minima say 1.5, the rounds 1.2
    plain, variant = [0.8, 1.0, 1.0], [1.2, 1.2, 1.2]
    assert bench_variants.paired_ratio(variant, plain) == pytest.approx(1.2)
    assert bench_variants.paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 1.0]) == pytest.approx(2.0)
    assert bench_variants.paired_ratio([2.0, 4.0], [1.0, 2.0, 1.0]) == pytest.approx(2.0)  # rounds it ran in


def test_bench_memory_worker_measures_a_training_step():
    row = cases.run_memory_subprocess(cases.BASELINE, (2, 50, 3, 8), threads=1, timeout=60)
    assert row.get("status", "ok") == "ok", row
    assert row["peak_rss_bytes"] >= row["rss_before_bytes"] > 0
    assert row["saved_tensor_bytes"] > 0 and row["step_seconds"] > 0


def test_bench_rejects_a_bad_shape(capsys):
    assert cli.main(["bench", "--shapes", "2,5,3", "--no-memory"]) == 2
    assert "B,T,D,H" in capsys.readouterr().err


def test_the_gpu_check_runs_its_smoke_mode(tmp_path):
    """benchmarks/gpu_check.py, prepared for a GPU machine, runs end to end on tiny shapes here."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["correctness"] and all(row["ok"] for row in results["correctness"])
    assert {row["mode"] for row in results["timing"]} == {"forward", "train"}
    # only torch may fail a timing (oneDNN's LSTM under CPU autocast on some CPUs), and only in bf16
    for row in results["timing"]:
        assert row["lstm_ms"] > 0
        if row["speedup"] is None:
            assert set(row["errors"]) == {"torch"} and row["precision"].startswith("bfloat16"), row
        else:
            assert row["speedup"] > 0
    # the tier-1 cases ran on the Triton kernels (their interpreter here) and equal the float64 reference
    assert results["variants"] and all(row["ok"] and row["kernel"].startswith("triton_") for row in results["variants"])
    assert len(results["variant_timing"]) == len(results["variants"])
