"""Shared fixtures: a tiny biased image set made here (colour is the shortcut), and a small
Colored MNIST from ../shared/data/mnist when it is there."""

import os
import pathlib

import numpy as np
import pytest

import debiasdd

REPO = pathlib.Path(__file__).resolve().parents[3]


def tiny_biased(n_per_group=(24, 4), side=8, seed=0):
    """2 classes (a horizontal or a vertical bar) x 2 colours (red, green), 3 x side x side in
    [0, 1]; class k is mostly colour k: n_per_group = (aligned, conflicting) per class."""
    rng = np.random.default_rng(seed)
    images, labels, groups = [], [], []
    for label in range(2):
        for attribute in range(2):
            count = n_per_group[0] if attribute == label else n_per_group[1]
            for _ in range(count):
                x = rng.uniform(0.0, 0.1, size=(3, side, side)).astype(np.float32)
                mid = side // 2
                if label == 0:
                    x[attribute, mid - 1 : mid + 1, :] = 0.9
                else:
                    x[attribute, :, mid - 1 : mid + 1] = 0.9
                images.append(x)
                labels.append(label)
                groups.append(label * 2 + attribute)
    order = rng.permutation(len(labels))
    return (
        np.stack(images)[order],
        np.array(labels, dtype=np.int64)[order],
        np.array(groups, dtype=np.int64)[order],
    )


@pytest.fixture(scope="session")
def tiny():
    return tiny_biased()


# Small, fast settings for a distillation of `tiny` (a few iterations of a narrow ConvNet).
FAST = dict(ipc=2, iterations=3, width=8, batch_real=8)


def mnist_dir():
    for candidate in (
        os.environ.get("DEBIASDD_MNIST_DIR"),
        REPO.parent / "shared" / "data" / "mnist",
        REPO / "data" / "mnist",
    ):
        if candidate and pathlib.Path(candidate).is_dir():
            return pathlib.Path(candidate)
    return None


@pytest.fixture(scope="session")
def cmnist():
    """Colored MNIST, ratio 0.05, 2000 train images (the test split is MNIST's 10,000)."""
    folder = mnist_dir()
    if folder is None:
        pytest.skip(
            "MNIST not found (../shared/data/mnist, data/mnist or DEBIASDD_MNIST_DIR): "
            "skipping the tests on Colored MNIST"
        )
    return debiasdd.generate(folder, 0.05, seed=0, train_size=2000, valid_size=0)


@pytest.fixture(scope="session")
def cli():
    """The debiasdd binary of the same build profile (target/debug, from `cargo test`), or skip."""
    path = os.environ.get("DEBIASDD_CLI") or str(REPO / "target" / "debug" / "debiasdd")
    if not os.access(path, os.X_OK):
        pytest.skip(f"no CLI binary at {path}: build it with `cargo build -p debiasdd-cli`")
    return path
