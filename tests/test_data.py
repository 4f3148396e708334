"""data.py: orientation and labels on real EMNIST and MNIST files, splits, batches, augmentation."""

import numpy as np
import pytest
import torch

import data
from conftest import real_data
from runs import UserError


def class_means(images, labels, classes=10):
    return np.stack([images[labels == c].float().mean(0).numpy() for c in range(classes)])


def correlation(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize(
    "dataset, folder", [("emnist-digits", "emnist"), ("emnist-byclass", "emnist")]
)
def test_emnist_is_made_upright_like_mnist(dataset, folder):
    """Each digit's mean EMNIST image matches MNIST's upright, not transposed as in the files."""
    emnist = class_means(
        *data.load_images(dataset, False, real_data(folder), download_missing=False)
    )
    mnist = class_means(*data.load_images("mnist", False, real_data(), download_missing=False))
    margins = [
        correlation(emnist[d], mnist[d]) - correlation(emnist[d].T, mnist[d]) for d in range(10)
    ]
    assert min(margins) > 0 and np.mean(margins) > 0.1, margins


def test_emnist_letters_labels_start_at_zero():
    images, labels = data.load_images(
        "emnist-letters", False, real_data("emnist"), download_missing=False
    )
    assert images.shape == (51, 28, 28) and images.dtype == torch.uint8
    assert (
        labels.min() == 0 and labels.max() == 25 and (labels == 0).sum() == 26
    )  # the sample's 26 a/A


def test_mnist_is_read_from_torchvisions_layout():
    images, labels = data.load_images("mnist", True, real_data(), download_missing=False)
    assert images.shape == (10_000, 28, 28) and sorted(labels.unique().tolist()) == list(range(10))


def test_missing_files_name_the_folder_and_the_offline_dataset(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}.*--dataset sklearn-digits"):
        data.load_images("emnist-balanced", True, tmp_path, download_missing=False)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable IDX file"):
        data.load_images("mnist", True, tmp_path, download_missing=False)


def test_splits_are_stratified_disjoint_and_seeded():
    labels = torch.arange(1000) % 7
    kept, held = data.stratified_split(labels, 0.1, seed=3)
    assert len(held) == 100 and len(kept) == 900 and not set(kept.tolist()) & set(held.tolist())
    assert (
        np.bincount(labels[held], minlength=7).max() - np.bincount(labels[held], minlength=7).min()
        <= 1
    )
    assert torch.equal(held, data.stratified_split(labels, 0.1, seed=3)[1])
    assert not torch.equal(held, data.stratified_split(labels, 0.1, seed=4)[1])
    split = data.training_data("sklearn-digits", "data", "cpu", val_fraction=0.1)
    assert (
        len(split["val"][1]) == 144
        and len(split["train"][1]) == 1293
        and split["train"][0].dtype == torch.uint8
    )


def test_an_epoch_shows_every_image_once_and_never_a_batch_of_one():
    images = torch.arange(11, dtype=torch.uint8).view(11, 1, 1).expand(11, 28, 28).contiguous()
    batches = list(
        data.train_batches(
            images, torch.arange(11), 0.0, 1 / 255, 5, torch.Generator().manual_seed(0)
        )
    )
    assert [len(target) for _, target in batches] == [5, 5]  # the last image alone is left out
    seen = torch.cat([target for _, target in batches])
    assert len(set(seen.tolist())) == 10
    assert all(torch.equal(inputs[:, 0, 0, 0], target.float()) for inputs, target in batches)


def test_augmentation_moves_images_and_leaves_them_alone_when_its_ranges_are_zero():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[:, 10:18, 12:16] = 255
    still = dict(degrees=0.0, translate=0.0, scale=(1.0, 1.0), shear=0.0)
    theta = data.affine_matrices(4, torch.Generator().manual_seed(0), **still)
    assert torch.equal(data.augment(images, theta, 0.0, 1.0), data.normalize(images, 0.0, 1.0))
    recipe = data.AUGMENTS["study-nearest"]
    theta = data.affine_matrices(
        4, torch.Generator().manual_seed(0), **{**recipe, **still, "translate": 0.1}
    )
    moved = data.augment(images, theta, 0.0, 1 / 255, "nearest")
    assert set(moved.unique().tolist()) <= {0.0, 255.0}  # nearest: whole pixels, no blur
    assert all(moved[i].sum() == images[i].float().sum() for i in range(4))  # shifted, not cut
    study = data.augment(
        images, data.affine_matrices(4, torch.Generator().manual_seed(0)), 0.0, 1 / 255
    )
    assert not torch.equal(study, data.normalize(images, 0.0, 1 / 255))
