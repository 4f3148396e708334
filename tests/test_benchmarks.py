"""Every benchmark the README quotes runs as written: tiny budgets, real samples, results checked for shape.

These are not timed tests: nothing here asserts a speed, only that each script still runs
against the current training code and writes the result it documents.
"""
import json

import pytest
import torch

from benchmarks import demo_latency, load_data, precision_accuracy, throughput, time_to_accuracy
from conftest import refused

@pytest.fixture
def mnist(mnist_sample):
    """The flags that point a benchmark at a cut of the real MNIST files (2,000 training, 1,000 test images)."""
    return ["--dataset", "mnist", "--data-dir", str(mnist_sample)]


@pytest.mark.slow
def test_time_to_accuracy_races_both_pipelines_on_real_digits(tmp_path, mnist):
    out = tmp_path / "tta.json"
    time_to_accuracy.main([*mnist, "--max-epochs", "2", "--target", "0.999", "--workers", "0", "--lr", "0.05",
                           "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["pipeline"] for row in result["results"]] == ["study", "ours"]
    for row in result["results"]:
        assert row["reached"] is False and row["epochs"] == 2 and len(row["accuracy"]) == 2
        assert all(0.1 < accuracy < 1 for accuracy in row["accuracy"])  # trained: above chance on 10 digits
        assert row["seconds"] > 0
    assert result["results"][0]["precision"] == "fp32"


def test_time_to_accuracy_stops_at_the_target(tmp_path, mnist):
    out = tmp_path / "tta.json"
    time_to_accuracy.main([*mnist, "--max-epochs", "3", "--target", "0.05", "--workers", "0", "--out", str(out)])
    for row in json.loads(out.read_text())["results"]:
        assert row["reached"] is True and row["epochs"] == 1


def test_throughput_reports_every_column_against_the_measured_peak(tmp_path, mnist):
    out = tmp_path / "throughput.json"
    throughput.main([*mnist, "--models", "lenet", "--seconds", "0.2", "--max-batches", "2", "--warmup", "1",
                     "--workers", "1", "--peak-seconds", "0.01", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["matmul_peak_gflops"]) == {"fp32", "bf16"} and all(
        value > 0 for value in result["matmul_peak_gflops"].values())
    (row,) = result["rows"]
    for key in ["study_train", "fp32_train", "bf16_train", "auto_train", "fp32_eval", "bf16_eval", "train_flops"]:
        assert row[key] > 0, key
    assert row["auto"] in ("fp32", "bf16") and row["auto_train"] == row[f"{row['auto']}_train"]
    assert 0 < row["auto_share_of_peak"] == pytest.approx(row["auto_train_gflops"] / result["matmul_peak_gflops"][
        row["auto"]])


@pytest.mark.slow
def test_precision_accuracy_compares_both_precisions(tmp_path, mnist):
    out = tmp_path / "precision.json"
    precision_accuracy.main([*mnist, "--epochs", "1", "--seeds", "0", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"fp32", "bf16"}
    for result in results.values():
        assert len(result["runs"]) == 1 and 0.1 < result["mean"] <= 1 and result["std"] == 0


def test_demo_latency_times_the_http_round_trip(tmp_path):
    out = tmp_path / "latency.json"
    demo_latency.main(["--models", "lenet", "--requests", "3", "--out", str(out)])
    (name, row), = json.loads(out.read_text())["results"].items()
    assert name == "lenet" and 0 < row["median_ms"] and row["p95_ms"] > 0


def test_benchmarks_write_under_outputs_unless_a_path_is_named():
    for script in (time_to_accuracy, throughput, demo_latency):
        assert script.parse_args([]).out.startswith("outputs/benchmarks/")
    assert precision_accuracy.parse_args([]).out is None  # outputs/benchmarks/precision_accuracy_DATASET.json
    import train
    assert throughput.parse_args([]).batch_size == train.DEFAULTS["batch_size"]
    assert time_to_accuracy.parse_args([]).lr == train.DEFAULTS["learning_rate"]


@pytest.mark.parametrize("script, argv", [
    (time_to_accuracy, ["--target", "1.5"]),
    (time_to_accuracy, ["--workers", "-1"]),
    (throughput, ["--seconds", "0"]),
    (precision_accuracy, ["--model", "nosuchnet"]),
    (demo_latency, ["--requests", "0"]),
])
def test_benchmarks_refuse_bad_values_in_one_line(script, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "error:" in error and "--help" in error


def test_benchmark_flags_are_checked_and_a_benchmark_removes_only_what_it_made(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "my_array.npy").write_bytes(b"kept")
    line = refused(load_data.main, ["--dir", str(mine), "--out", str(tmp_path / "out.json")], capsys)
    assert "not a folder this benchmark made" in line and (mine / "my_array.npy").read_bytes() == b"kept"
    if not torch.cuda.is_available():
        assert "CUDA" in refused(load_data.main, ["--device", "cuda", "--out", str(tmp_path / "out.json")], capsys)
    for module in (throughput, time_to_accuracy, load_data):
        assert "at least 2" in refused(module.main, ["--batch-size", "1"], capsys)
    assert not (tmp_path / "out.json").exists()
