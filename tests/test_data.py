import gzip
import os
import zipfile

import numpy as np
import pytest
import torch

import data
from conftest import fake_split, real_data, write_idx
from data import CLASSES, augment, load_images
from runs import DataError


# ----------------------------------------------------------------------------- real samples

def class_means(images, labels, classes=10):
    return torch.stack([images[labels == c].double().mean(0) for c in range(classes)])


def correlation(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_emnist_digits_are_upright_like_mnist():
    emnist_images, emnist_labels = load_images("emnist-digits", train=False,
                                               data_dir=real_data("emnist"), download=False)
    mnist_images, mnist_labels = load_images("mnist", train=False, data_dir=real_data(), download=False)
    assert emnist_images.shape == (600, 28, 28) and emnist_images.dtype == torch.uint8
    assert torch.bincount(emnist_labels).tolist() == [60] * 10
    emnist_means, mnist_means = class_means(emnist_images, emnist_labels), class_means(mnist_images, mnist_labels)
    margins = []
    for digit in range(10):
        upright = correlation(emnist_means[digit], mnist_means[digit])
        transposed = correlation(emnist_means[digit].T, mnist_means[digit])
        assert upright > transposed, f"digit {digit}: upright {upright:.3f}, transposed {transposed:.3f}"
        assert upright > 0.45
        margins.append(upright - transposed)
    assert sum(margins) / 10 > 0.15  # a 0 looks alike both ways; a 7 does not
    # each EMNIST image, matched to the nearest MNIST class mean, finds its digit far more often
    # upright than transposed (EMNIST scales characters to fill the frame, so not always)
    templates = mnist_means.flatten(1)
    templates = (templates - templates.mean(1, keepdim=True))
    templates /= templates.norm(dim=1, keepdim=True)
    def nearest_mean_accuracy(images):
        flat = images.double().flatten(1)
        flat = flat - flat.mean(1, keepdim=True)
        return ((flat @ templates.T).argmax(1) == emnist_labels).double().mean().item()
    assert nearest_mean_accuracy(emnist_images) > nearest_mean_accuracy(emnist_images.transpose(1, 2)) + 0.2


def test_emnist_letters_labels_start_at_zero_with_the_right_characters():
    images, labels = load_images("emnist-letters", train=False, data_dir=real_data("emnist"), download=False)
    assert images.shape == (51, 28, 28)
    counts = torch.bincount(labels, minlength=26)
    assert labels.min() == 0 and labels.max() == 25
    assert counts[0] == 26 and (counts[1:] == 1).all()  # 26 of a/A, then one of each other letter
    assert CLASSES["emnist-letters"][0] == "A" and CLASSES["emnist-letters"][25] == "Z"


def test_label_maps_agree_with_the_official_mapping_files():
    for dataset in ["emnist-byclass", "emnist-bymerge", "emnist-balanced", "emnist-letters", "emnist-digits"]:
        mapping = real_data("emnist", f"{dataset}-mapping.txt").read_text().split("\n")
        characters = "".join(chr(int(line.split()[1])) for line in mapping if line.strip())
        assert "".join(CLASSES[dataset]) == characters


def test_read_only_data_folder_is_left_alone_and_second_load_is_identical(tmp_path):
    folder = tmp_path / "readonly"
    upright, labels, stored = fake_split(124)
    write_idx(folder / f"{BYCLASS[0]}.gz", stored)
    write_idx(folder / f"{BYCLASS[1]}.gz", labels)
    before = sorted(path.name for path in folder.iterdir())
    folder.chmod(0o555)  # a read-only data folder (which even root must not write to)
    try:
        first = load_images("emnist-byclass", train=True, data_dir=folder, download=False)
        second = load_images("emnist-byclass", train=True, data_dir=folder, download=False)
    finally:
        folder.chmod(0o755)
    assert sorted(path.name for path in folder.iterdir()) == before
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2  # the private cache took the arrays
    assert np.array_equal(second[0].numpy(), upright) and torch.equal(first[1], second[1])


def test_test_split_loads_without_training_files():
    images, _ = load_images("emnist-digits", train=False, data_dir=real_data("emnist"), download=False)
    assert len(images) == 600
    with pytest.raises(DataError, match="emnist-digits-train-images-idx3-ubyte"):
        load_images("emnist-digits", train=True, data_dir=real_data("emnist"), download=False)


# ----------------------------------------------------------------------------- files the tests write

BYCLASS = ["emnist-byclass-train-images-idx3-ubyte", "emnist-byclass-train-labels-idx1-ubyte"]


@pytest.mark.parametrize("layout", ["flat", "gzip-folder", "torchvision-raw", "zip"])
def test_byclass_files_in_every_supported_layout(tmp_path, layout):
    upright, labels, stored = fake_split(124)
    if layout == "zip":
        with zipfile.ZipFile(tmp_path / "gzip.zip", "w") as archive:
            archive.writestr(f"gzip/{BYCLASS[0]}.gz", gzip.compress(write_idx(tmp_path / "i", stored, False).read_bytes()))
            archive.writestr(f"gzip/{BYCLASS[1]}.gz", gzip.compress(write_idx(tmp_path / "l", labels, False).read_bytes()))
    else:
        folder = {"flat": tmp_path, "gzip-folder": tmp_path / "gzip", "torchvision-raw": tmp_path / "EMNIST" / "raw"}
        # torchvision's download leaves the files uncompressed, without .gz
        compress = layout != "torchvision-raw"
        suffix = ".gz" if compress else ""
        write_idx(folder[layout] / (BYCLASS[0] + suffix), stored, compress)
        write_idx(folder[layout] / (BYCLASS[1] + suffix), labels, compress)
    for _ in range(2):  # the second load reads the cache
        images, loaded_labels = load_images("emnist-byclass", train=True, data_dir=tmp_path, download=False)
        assert images.dtype == torch.uint8 and loaded_labels.dtype == torch.int64
        assert np.array_equal(images.numpy(), upright)  # transposed back to upright
        assert np.array_equal(loaded_labels.numpy(), labels)


def test_truncated_file_names_the_file(tmp_path):
    _, labels, stored = fake_split(62)
    images_file = write_idx(tmp_path / f"{BYCLASS[0]}.gz", stored)
    write_idx(tmp_path / f"{BYCLASS[1]}.gz", labels)
    images_file.write_bytes(images_file.read_bytes()[:-200])
    with pytest.raises(DataError, match=f"{BYCLASS[0]}.gz is corrupt or truncated"):
        load_images("emnist-byclass", train=True, data_dir=tmp_path, download=False)
    # an uncompressed file cut short is caught by the header's sizes
    images_file.unlink()
    cut = write_idx(tmp_path / BYCLASS[0], stored, compress=False)
    cut.write_bytes(cut.read_bytes()[:-28])
    with pytest.raises(DataError, match=f"{BYCLASS[0]} is corrupt or truncated"):
        load_images("emnist-byclass", train=True, data_dir=tmp_path, download=False)


def test_labels_of_another_dataset_are_refused(tmp_path):
    _, labels, stored = fake_split(62)
    write_idx(tmp_path / "emnist-digits-test-images-idx3-ubyte.gz", stored)
    write_idx(tmp_path / "emnist-digits-test-labels-idx1-ubyte.gz", labels)  # 0..61, not 0..9
    with pytest.raises(DataError, match="right file"):
        load_images("emnist-digits", train=False, data_dir=tmp_path, download=False)


def test_missing_data_without_download_names_files_and_folders(tmp_path):
    with pytest.raises(DataError) as error:
        load_images("emnist-byclass", train=True, data_dir=tmp_path / "nowhere", download=False)
    message = str(error.value)
    assert "\n" not in message
    for expected in [f"{BYCLASS[0]}.gz", f"{BYCLASS[1]}.gz", str(tmp_path / "nowhere"), "--dataset sklearn-digits"]:
        assert expected in message


def test_sklearn_digits_is_a_fixed_stratified_split():
    train_images, train_labels = load_images("sklearn-digits", train=True)
    test_images, test_labels = load_images("sklearn-digits", train=False)
    assert train_images.shape[1:] == (28, 28) and train_images.dtype == torch.uint8
    assert len(train_labels) + len(test_labels) == 1797
    assert train_images.max() == 255 and train_images[:, :3].max() == 0  # centred, 4-pixel border like MNIST
    assert torch.equal(load_images("sklearn-digits", train=False)[0], test_images)
    train_share = torch.bincount(train_labels) / len(train_labels)
    test_share = torch.bincount(test_labels) / len(test_labels)
    assert (train_share - test_share).abs().max() < 0.02


# ----------------------------------------------------------------------------- splits

def test_stratified_split_is_disjoint_complete_stratified_and_reproducible():
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 62, 10_000))
    kept, held = data.stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(kept, held)) == 0
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(10_000))
    assert len(held) == 1000
    share = torch.bincount(labels[held], minlength=62) / torch.bincount(labels, minlength=62)
    assert (share - 0.1).abs().max() < 0.06
    again_kept, again_held = data.stratified_split(labels, 0.1, seed=3)
    assert torch.equal(held, again_held) and torch.equal(kept, again_kept)
    assert not torch.equal(held, data.stratified_split(labels, 0.1, seed=4)[1])


def test_subset_and_mini_split_sizes():
    labels = torch.arange(20_000) % 62
    subset = data.stratified_subset(labels, 1234, seed=0)
    assert len(subset) == 1234 and len(set(subset.tolist())) == 1234
    mini_train, mini_val = data.mini_split(labels, seed=0)
    assert len(mini_train) + len(mini_val) == 2000 and len(mini_val) == 400
    assert len(np.intersect1d(mini_train, mini_val)) == 0


def test_sharded_batches_cover_the_data_once():
    images = torch.arange(103).view(103, 1, 1).expand(103, 28, 28).to(torch.uint8)
    labels = torch.arange(103)
    seen = [int(label) for rank in range(2) for _, batch_labels in
            data.iterate_batches(images, labels, 10, rank=rank, world_size=2) for label in batch_labels]
    assert sorted(seen) == list(range(103))  # evaluation: every item exactly once
    generator = torch.Generator().manual_seed(0)
    shards = [[int(label) for _, batch_labels in data.iterate_batches(
        images, labels, 10, shuffle=True, generator=generator.manual_seed(0), rank=rank, world_size=2)
        for label in batch_labels] for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51 and not set(shards[0]) & set(shards[1])


def test_mean_std_matches_a_float_computation():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (300, 28, 28), dtype=np.uint8))
    mean, std = data.mean_std(images, chunk=64)
    reference = images.double() / 255
    assert mean == pytest.approx(reference.mean().item(), abs=1e-9)
    assert std == pytest.approx(reference.std(unbiased=False).item(), abs=1e-9)


# ----------------------------------------------------------------------------- augmentation

def stroke_batch(count=16):
    batch = torch.zeros(count, 28, 28, dtype=torch.uint8)
    batch[:, 6:22, 12:16] = 255
    batch[:, 6:9, 8:20] = 200
    return batch


def test_augment_shape_dtype_and_per_image_randomness():
    batch = stroke_batch()
    out = augment(batch, 0.1736, 0.3248, torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 28, 28) and out.dtype == torch.float32
    assert all(not torch.allclose(out[i], out[0]) for i in range(1, 16))  # same input, different warps


def test_augment_is_reproducible_under_a_seed():
    batch = stroke_batch()
    first = augment(batch, 0.5, 0.5, torch.Generator().manual_seed(7))
    second = augment(batch, 0.5, 0.5, torch.Generator().manual_seed(7))
    third = augment(batch, 0.5, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_augment_with_zero_ranges_is_normalisation_alone():
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8))
    out = augment(batch, 0.2, 0.3, degrees=0, translate=0, scale=(1, 1), shear=0)
    assert torch.allclose(out, data.normalize(batch, 0.2, 0.3), atol=1e-3)


def test_shift_flip_mirrors_about_half_the_images_and_nothing_else():
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8))
    recipe = {**data.AUGMENTS["shift-flip"], "translate": 0}  # the mirror alone
    out = augment(batch, 0.0, 1.0 / 255, torch.Generator().manual_seed(0), **recipe)[:, 0]
    same = (out - batch.float()).abs().amax(dim=(1, 2)) < 1e-3
    mirrored = (out - batch.float().flip(-1)).abs().amax(dim=(1, 2)) < 1e-3
    assert torch.all(same ^ mirrored)  # every image is exactly itself or its mirror
    assert 70 < int(mirrored.sum()) < 130


def test_the_study_recipe_draws_no_mirrors_and_the_same_numbers_as_before():
    theta = data.affine_matrices(500, torch.Generator().manual_seed(3), **data.AUGMENTS["study"])
    flipped = data.affine_matrices(500, torch.Generator().manual_seed(3), **{**data.AUGMENTS["study"], "flip": True})
    assert torch.all(theta[:, 0, 0] > 0)  # a mirror would make the x scale negative
    negated = flipped[:, 0, 0] < 0
    assert torch.equal(flipped[~negated], theta[~negated]) and torch.equal(flipped[negated, 0], -theta[negated, 0])
    assert data.AUGMENTS["none"] is None
    assert data.augment_recipe(True) == "study" and data.augment_recipe(False) == "none"


def test_augment_translation_moves_the_ink_by_at_most_ten_percent():
    batch = stroke_batch(64)
    out = augment(batch, 0.0, 1.0 / 255, torch.Generator().manual_seed(0), degrees=0, scale=(1, 1), shear=0)
    columns = torch.arange(28).float()
    def centre(images):
        mass = images.float().clamp(min=0).sum(dim=(-2,))
        return (mass * columns).sum(-1) / mass.sum(-1)
    shift = centre(out[:, 0]) - centre(batch.float())
    assert shift.abs().max() <= 2.8 + 0.2 and shift.abs().max() > 1.0  # 10 % of 28 pixels


@pytest.mark.slow
def test_without_the_real_samples_their_tests_skip_in_one_line_or_fail_when_required(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    test = "tests/test_data.py::test_emnist_letters_labels_start_at_zero_with_the_right_characters"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test]
    environment = {**os.environ, "REAL_DATA": str(tmp_path / "absent"), "REQUIRE_REAL_DATA": ""}
    skipped = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment, timeout=120)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    (line,) = [line for line in skipped.stdout.splitlines() if line.startswith("SKIPPED")]
    assert f"real samples missing: {tmp_path / 'absent'}/{{emnist,MNIST/raw}}" in line
    required = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**environment, "REQUIRE_REAL_DATA": "1"})
    assert required.returncode == 1 and "1 failed" in required.stdout and "real samples missing" in required.stdout


@pytest.mark.slow
def test_a_fifo_named_like_a_cache_is_never_opened_and_an_empty_xdg_cache_home_means_unset(tmp_path):
    import subprocess
    import sys
    import threading

    upright, labels, stored = fake_split(62)
    write_idx(tmp_path / f"{BYCLASS[0]}.gz", stored)
    write_idx(tmp_path / f"{BYCLASS[1]}.gz", labels)
    stem = data.cache_file(tmp_path / f"{BYCLASS[0]}.gz", transpose=True)
    os.mkfifo(stem.with_name(f"{stem.name}.00000000.npy"))  # opening it for reading would block forever
    loaded = []
    reader = threading.Thread(target=lambda: loaded.append(load_images("emnist-byclass", data_dir=tmp_path,
                                                                        download=False)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert loaded and np.array_equal(loaded[0][0].numpy(), upright)
    printed = subprocess.run([sys.executable, "-c", "import data; print(data.CACHE_DIR)"], capture_output=True,
                             text=True, env={**os.environ, "XDG_CACHE_HOME": ""}, cwd=data.Path(data.__file__).parent,
                             timeout=60, check=True).stdout.strip()
    assert printed == str(data.Path.home() / ".cache" / "emnist-cnn")  # not ./emnist-cnn in the current folder


def test_the_missing_data_message_offers_gzip_zip_only_for_emnist(tmp_path):
    with pytest.raises(DataError) as mnist:
        load_images("mnist", train=False, data_dir=tmp_path, download=False)
    with pytest.raises(DataError) as emnist:
        load_images("emnist-digits", train=False, data_dir=tmp_path, download=False)
    assert "gzip.zip" not in str(mnist.value) and "t10k-images-idx3-ubyte.gz" in str(mnist.value)
    assert "(or gzip.zip holding them)" in str(emnist.value)
