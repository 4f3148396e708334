"""The committed results: the README's numbers are the committed files', the carve is the
official one, and the published networks and the study's own weights score what the README says."""
import json
import re

import pytest

import evaluate
from conftest import ROOT, real_data, run

BYCLASS = ROOT / "results" / "emnist-byclass"
CHOSEN = BYCLASS / "chosen-on-validation" / "outputs" / "eval"
PUBLISHED = BYCLASS / "published" / "eval"  # the published networks' numbers
NETWORKS = ["lenet", "alexnet", "vggnet", "resnet", "spinalnet"]


def readme_rows(path):
    """{first cell: [numbers in the other cells]} of the first table after '| network |'."""
    rows = {}
    for line in path.read_text().split("| network |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = [re.search(r"[\d.]+|-", cell).group() for cell in cells[1:]]
    return rows


def accuracy(path):
    return f"{100 * json.loads(path.read_text())['test']['accuracy']:.2f}"


@pytest.mark.parametrize("readme", [ROOT / "README.md", BYCLASS / "README.md"])
def test_the_readme_tables_are_the_committed_numbers(readme):
    rows = readme_rows(readme)
    study = json.loads((BYCLASS / "study-weights.json").read_text())
    for name, label in zip(NETWORKS, ["LeNet", "AlexNet", "VGGNet", "ResNet", "SpinalNet"]):
        theirs, ours, chosen, published = rows[label][:4]
        assert ours == accuracy(BYCLASS / "study" / "outputs" / "eval" / f"{name}.json")
        assert chosen == accuracy(CHOSEN / f"{name}.json")
        assert published == accuracy(PUBLISHED / f"{name}.json")
        file = f"{name}_tuned.pth" if f"{name}_tuned.pth" in study else f"{name}.pth"
        assert theirs == (f"{100 * study[file]['accuracy']:.2f}" if file in study else "-")


@pytest.mark.slow
def test_the_carve_is_the_official_one_and_the_published_networks_score_their_numbers(tmp_path):
    carve = run(BYCLASS / "carve.py", real_data("emnist"), tmp_path / "carve")
    assert carve.returncode == 0 and "b7bf6a4c71086b83" in carve.stdout, carve.stderr
    again = run(BYCLASS / "carve.py", real_data("emnist"), tmp_path / "carve")
    assert again.returncode != 0 and "never written over" in again.stderr
    for name in ("lenet", "resnet"):
        evaluate.main(["--ckpt", str(BYCLASS / "published" / f"{name}.pth"), "--split", "test",
                       "--data-dir", str(tmp_path / "carve"), "--no-download",
                       "--outputs", str(tmp_path / "out")])
        ours = accuracy(tmp_path / "out" / "eval" / f"{name}.json")
        assert ours == accuracy(PUBLISHED / f"{name}.json")
    scored = run(BYCLASS / "study_weights.py", "--weights", real_data("study-weights"),
                 "--data-dir", tmp_path / "carve", "--output", tmp_path / "study.json")
    assert scored.returncode == 0, scored.stderr
    committed = json.loads((BYCLASS / "study-weights.json").read_text())
    assert json.loads((tmp_path / "study.json").read_text()) == committed
