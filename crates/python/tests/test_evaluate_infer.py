"""evaluate and infer_groups on a small Colored MNIST."""

import numpy as np
import pytest

import debiasdd


METRICS = ["accuracy", "aligned_accuracy", "conflicting_accuracy", "worst_group_accuracy",
           "deo_max", "deo_mean"]


def test_evaluate_returns_the_cli_summary(cmnist, tmp_path):
    train = cmnist.train
    pick = np.concatenate([np.flatnonzero(train.groups == g)[:1] for g in range(100)
                           if (train.groups == g).any()])
    subset = debiasdd.SyntheticSet(train.images[pick], train.labels[pick], train.groups[pick])
    seen = []
    heatmap = tmp_path / "groups.png"
    result = debiasdd.evaluate(
        cmnist, subset, models=2, epochs=3, width=8, augment=False, progress=seen.append,
        heatmap=heatmap,
    )
    for key in METRICS:
        assert set(result[key]) == {"mean", "std"}, key
        assert 0.0 <= result[key]["mean"] <= 100.0
    matrix = np.array(result["group_accuracy_mean"], dtype=float)
    assert matrix.shape == (10, 10)
    assert result["n_runs"] == 2 and len(result["runs"]) == 2
    assert result["n_train"] == len(pick) and result["n_test"] == 10000
    assert result["config"]["train"]["epochs"] == 3
    # The worst group is no better than the mean.
    assert result["worst_group_accuracy"]["mean"] <= result["accuracy"]["mean"]
    assert [(p["model"], p["epoch"]) for p in seen] == [(m, e) for m in range(2) for e in range(4)]
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same seed, same numbers.
    again = debiasdd.evaluate(cmnist, subset, models=2, epochs=3, width=8, augment=False)
    assert again["accuracy"] == result["accuracy"]


def test_evaluate_on_a_real_split(cmnist):
    result = debiasdd.evaluate(cmnist, cmnist.train, models=1, epochs=1, width=8, augment=False)
    assert result["n_train"] == 2000 and result["accuracy"]["mean"] > 30.0


def test_an_exception_in_the_callback_stops_the_evaluation(cmnist):
    syn = debiasdd.SyntheticSet(cmnist.train.images[:50], cmnist.train.labels[:50], n_classes=10)
    calls = []

    def stop(p):
        calls.append(p)
        if p["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        debiasdd.evaluate(cmnist, syn, models=3, epochs=100, width=8, progress=stop)
    assert len(calls) == 2


def test_infer_groups_then_distill(cmnist, tmp_path):
    seen = []
    inferred, report = debiasdd.infer_groups(
        cmnist, epochs=1, width=8, progress=seen.append, heatmap=tmp_path / "infer.png"
    )
    assert inferred.inferred is not None and cmnist.inferred is None
    assert report["agreement"] is not None
    assert report["held_out_accuracy"] > report["chance_accuracy"] + 1
    assert [p["fold"] for p in seen] == [0, 1]
    # The train groups changed, valid and test kept theirs.
    assert inferred.train.n_attributes == len(report["attributes"])
    np.testing.assert_array_equal(inferred.train.labels, cmnist.train.labels)
    np.testing.assert_array_equal(inferred.test.groups, cmnist.test.groups)
    syn = debiasdd.distill(inferred, method="dm", ipc=10, iterations=1, width=8, batch_real=4)
    assert len(syn) == 100
    path = tmp_path / "inferred.safetensors"
    inferred.save(path)
    assert debiasdd.load(path).inferred == inferred.inferred
    with pytest.raises(ValueError, match="method"):
        debiasdd.infer_groups(cmnist, method="magic")
