"""models.py: the six networks' shapes, a new head, and checkpoints a user can get wrong."""

import pytest
import torch

from models import MODELS, build_model, load_checkpoint, save_checkpoint
from transfer_mnist import replace_head
from runs import UserError


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_network_maps_a_batch_of_characters_to_class_logits(name):
    model = build_model(name, 62).eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 62)
    replace_head(model, 10, keep_rows=list(range(10)))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_a_new_head_from_old_rows_gives_the_same_logits_for_those_classes():
    model = build_model("resnet", 62).eval()
    inputs = torch.randn(3, 1, 28, 28)
    before = model(inputs)[:, [5, 7, 9]]
    after = replace_head(model, 3, keep_rows=[5, 7, 9])(inputs)
    assert torch.allclose(before, after, atol=1e-6)


def test_a_checkpoint_round_trips_and_foreign_files_are_refused(tmp_path):
    model = build_model("lenet", 10)
    path = tmp_path / "lenet.pth"
    save_checkpoint(
        path,
        {
            "model": "lenet",
            "num_classes": 10,
            "dataset": "mnist",
            "classes": list("0123456789"),
            "mean": 0.13,
            "std": 0.31,
            "state_dict": model.state_dict(),
        },
    )
    ckpt, loaded = load_checkpoint(path)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values())
    )
    assert [p.name for p in tmp_path.iterdir()] == ["lenet.pth"]  # no temporary file left behind
    with pytest.raises(UserError, match="holds lenet"):
        load_checkpoint(path, "resnet")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save({"weights": 1}, tmp_path / "foreign.pth")
    for name in ("junk.pth", "foreign.pth"):
        with pytest.raises(UserError, match="not a checkpoint of this project"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")
