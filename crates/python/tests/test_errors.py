"""Bad input raises a Python exception with a message that names the problem and the fix."""

import numpy as np
import pytest

import debiasdd
from conftest import FAST


def distill(images, labels, groups=None, **kwargs):
    return debiasdd.distill(images, labels, groups, **{**FAST, **kwargs})


def test_wrong_dtype(tiny):
    images, labels, groups = tiny
    with pytest.raises(TypeError, match="images: dtype uint8.*divide by 255|images / 255"):
        distill((images * 255).astype(np.uint8), labels, groups)
    with pytest.raises(TypeError, match="labels: dtype float64, expected integers"):
        distill(images, labels.astype(np.float64), groups)
    with pytest.raises(TypeError, match="groups: dtype"):
        distill(images, labels, groups.astype(np.float32))
    with pytest.raises(TypeError, match="progress: expected None, True or a callable"):
        distill(images, labels, groups, progress="yes")


def test_wrong_shape(tiny):
    images, labels, groups = tiny
    with pytest.raises(ValueError, match=r"images: shape \[56, 8, 8\], expected 4 dimensions"):
        distill(images[:, 0], labels, groups)
    with pytest.raises(ValueError, match=r"labels: shape \[55\], expected \(56,\)"):
        distill(images, labels[:-1], groups)
    with pytest.raises(ValueError, match=r"groups: shape \[56, 1\]"):
        distill(images, labels, groups[:, None])


def test_labels_out_of_range(tiny):
    images, labels, groups = tiny
    bad = labels.copy()
    bad[3] = -2
    with pytest.raises(ValueError, match=r"labels\[3\] is -2"):
        distill(images, bad, groups)
    with pytest.raises(ValueError, match=r"labels\[\d+\] is 1, outside the 1 classes"):
        distill(images, labels, None, n_classes=1, mode="class")


def test_groups_that_do_not_match_labels(tiny):
    images, labels, groups = tiny
    bad = groups.copy()
    i = int(np.flatnonzero(labels == 0)[0])
    bad[i] = 3  # a group of class 1
    with pytest.raises(ValueError, match=rf"groups\[{i}\] is 3, not a group of its label 0"):
        distill(images, labels, bad, n_attributes=2)
    with pytest.raises(ValueError, match="groups do not match labels"):
        distill(images, labels, bad)
    # Only class 0's groups given: the layout is ambiguous.
    only_zero = np.where(labels == 0, groups, -1)
    with pytest.raises(ValueError, match="pass n_attributes="):
        distill(images, labels, only_zero)


def test_non_finite_and_out_of_range_pixels(tiny):
    images, labels, groups = tiny
    bad = images.copy()
    bad[5, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"images\[5\]: value \d+ is NaN; every pixel must be a finite"):
        distill(bad, labels, groups)
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*divide"):
        distill(images * 255, labels, groups)
    # A synthetic set is pixel space but not clipped: any finite value; NaN still refused.
    assert debiasdd.SyntheticSet(images * 2 - 0.5, labels, groups).images.min() < 0
    with pytest.raises(ValueError, match=r"images\[5\]: value \d+ is NaN"):
        debiasdd.SyntheticSet(bad, labels, groups)


def test_bad_settings(tiny):
    images, labels, groups = tiny
    with pytest.raises(ValueError, match="ipc"):
        distill(images, labels, groups, ipc=0)
    with pytest.raises(ValueError, match="method: unknown value `mtt`; expected one of: dc, dm"):
        distill(images, labels, groups, method="mtt")
    with pytest.raises(ValueError, match="`outer_loop`: is a DC setting; method dm"):
        distill(images, labels, groups, method="dm", outer_loop=3)
    with pytest.raises(ValueError, match='mode "group" needs every image\'s group'):
        distill(images, labels, None)
    with pytest.raises(ValueError, match="resume=True needs checkpoint=PATH"):
        distill(images, labels, groups, resume=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distill(images, labels, groups, resume=True, checkpoint="/nonexistent/ckpt.safetensors")
    with pytest.raises(ValueError, match="labels are missing"):
        debiasdd.distill(images)
    with pytest.raises(ValueError, match="device"):
        distill(images, labels, groups, device="tpu")


def test_missing_and_truncated_files(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        debiasdd.load(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        debiasdd.load_synthetic(tmp_path / "missing.safetensors")
    images, labels, groups = tiny
    path = tmp_path / "syn.safetensors"
    debiasdd.SyntheticSet(images, labels, groups).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="syn.safetensors"):
        debiasdd.load_synthetic(path)
    with pytest.raises(FileNotFoundError, match="IDX"):
        debiasdd.generate(tmp_path / "no-mnist", 0.01)


def test_bad_generate_and_evaluate_arguments(cmnist, tiny):
    from conftest import mnist_dir

    with pytest.raises(ValueError, match="ratio"):
        debiasdd.generate(mnist_dir(), 1.5)
    with pytest.raises(ValueError, match="preset: unknown preset"):
        debiasdd.generate(mnist_dir(), 0.01, preset="celeba")
    with pytest.raises(TypeError, match="synthetic: expected a SyntheticSet"):
        debiasdd.evaluate(cmnist, np.zeros((2, 3, 28, 28), np.float32))
    images, labels, groups = tiny
    small = debiasdd.SyntheticSet(images, labels, groups)
    with pytest.raises(ValueError, match="score a set on the dataset it was made from"):
        debiasdd.evaluate(cmnist, small, models=1, epochs=1, width=8)
    syn = debiasdd.SyntheticSet(cmnist.train.images[:20], cmnist.train.labels[:20], n_classes=10)
    with pytest.raises(ValueError, match="0 models"):
        debiasdd.evaluate(cmnist, syn, models=0)
