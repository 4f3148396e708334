"""The Fashion-MNIST study's scripts (results/fashion-mnist/): bad options are refused before any
work, and table.py prints what the committed JSONs hold."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

STUDY = ROOT / "results" / "fashion-mnist"


@pytest.mark.parametrize("options, wanted", [
    (["--schedule", "linear"], "--schedule takes cosine"),
    (["--augment", "rotate"], "--augment takes shift-flip"),
    (["--epochs", "0"], "--epochs needs a whole number above 0"),
    (["--finetune-epochs", "two"], "--finetune-epochs needs a whole number above 0"),
    (["--seed", "0"], "--seed needs a whole number above 0"),
    (["--fast"], "unknown option --fast"),
])
def test_run_study_refuses_bad_options_in_one_line_before_any_work(options, wanted):
    before = sorted(path.name for path in STUDY.iterdir())
    result = subprocess.run(["bash", str(STUDY / "run_study.sh"), *options, "lenet"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and wanted in result.stdout and len(result.stdout.splitlines()) == 1
    assert sorted(path.name for path in STUDY.iterdir()) == before


def test_table_prints_every_committed_comparison():
    printed = subprocess.run([sys.executable, str(STUDY / "table.py")], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    comparisons = sorted(STUDY.glob("**/outputs/eval/comparison.json"))
    assert comparisons
    for path in comparisons:
        if "seed-" in str(path) or "ensnet" in str(path):
            continue  # the seeds are summarised as mean +- std; EnsNet is listed as a subset
        for name, result in json.loads(path.read_text())["models"].items():
            accuracy = f"| {100 * result['test']['accuracy']:.2f} |"
            assert accuracy in printed, (path, name)
