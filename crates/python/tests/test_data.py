"""Datasets and synthetic sets as numpy arrays, and their files."""

import numpy as np
import pytest

import debiasdd
from conftest import FAST


def test_generated_dataset_as_arrays(cmnist, tmp_path):
    ds = cmnist
    assert (ds.n_classes, ds.n_attributes, ds.shape) == (10, 10, (3, 28, 28))
    train = ds.train
    assert len(train) == 2000 and len(ds.valid) == 0 and len(ds.test) == 10000
    images = train.images
    assert images.dtype == np.float32 and images.shape == (2000, 3, 28, 28)
    assert 0.0 <= images.min() and images.max() <= 1.0
    labels, attributes, groups = train.labels, train.attributes, train.groups
    assert labels.dtype == np.int64 and labels.shape == (2000,)
    np.testing.assert_array_equal(groups, labels * 10 + attributes)
    # Ratio 0.05: most images have their class's colour.
    aligned = np.mean(attributes == labels)
    assert 0.9 < aligned < 0.99, aligned
    # Pixel values are bytes / 255.
    np.testing.assert_array_equal(np.round(images * 255) / 255, images)

    path = tmp_path / "cmnist.safetensors"
    ds.save(path)
    again = debiasdd.load(path)
    for name in ("train", "valid", "test"):
        a, b = getattr(ds, name), getattr(again, name)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.groups, b.groups)
    assert again.info == ds.info and again.inferred is None
    assert "cmnist" in repr(ds) or "ratio0.05" in repr(ds)


def test_synthetic_set_from_arrays_round_trips(tiny, tmp_path):
    images, labels, groups = tiny
    syn = debiasdd.SyntheticSet(images, labels, groups)
    assert (len(syn), syn.n_classes, syn.n_attributes, syn.shape) == (len(labels), 2, 2, (3, 8, 8))
    np.testing.assert_array_equal(syn.images, images)
    np.testing.assert_array_equal(syn.groups, groups)
    # Default normalisation: the images' own per-channel statistics.
    np.testing.assert_allclose(syn.mean, images.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(syn.std, images.std(axis=(0, 2, 3)), rtol=1e-4)
    path = tmp_path / "syn.safetensors"
    syn.save(path)
    back = debiasdd.load_synthetic(path)
    np.testing.assert_array_equal(back.images, images)
    np.testing.assert_array_equal(back.labels, labels)
    assert back.mean == syn.mean and back.std == syn.std


def test_synthetic_file_reads_with_safetensors_and_torch(tiny, tmp_path):
    images, labels, groups = tiny
    syn = debiasdd.distill(images, labels, groups, method="dm", **FAST)
    path = tmp_path / "syn.safetensors"
    syn.save(path)
    safetensors_numpy = pytest.importorskip(
        "safetensors.numpy", reason="safetensors is not installed: pip install safetensors"
    )
    tensors = safetensors_numpy.load_file(str(path))
    np.testing.assert_array_equal(tensors["images"], syn.images)
    np.testing.assert_array_equal(tensors["labels"], syn.labels)
    np.testing.assert_array_equal(tensors["groups"], syn.groups)
    assert tensors["images"].dtype == np.float32 and tensors["labels"].dtype == np.int64


def test_synthetic_file_loads_into_a_torch_dataset(tiny, tmp_path):
    torch = pytest.importorskip(
        "torch", reason="PyTorch is not installed here: the torch round trip is skipped"
    )
    from safetensors.torch import load_file

    images, labels, groups = tiny
    syn = debiasdd.distill(images, labels, groups, method="dm", **FAST)
    path = tmp_path / "syn.safetensors"
    syn.save(path)
    tensors = load_file(str(path))
    dataset = torch.utils.data.TensorDataset(tensors["images"], tensors["labels"])
    x, y = dataset[0]
    assert tuple(x.shape) == (3, 8, 8) and y.dtype == torch.int64
    assert torch.equal(tensors["images"], torch.from_numpy(syn.images))
    # A torch tensor goes back in through __array__.
    again = debiasdd.SyntheticSet(tensors["images"], tensors["labels"], tensors["groups"])
    np.testing.assert_array_equal(again.images, syn.images)
