"""distill: arrays in, synthetic set out; determinism, the CLI's result, progress, stop and
resume, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import debiasdd
from conftest import FAST, tiny_biased


@pytest.mark.parametrize("method", ["dc", "dm"])
@pytest.mark.parametrize("mode", ["class", "group", "class-vs-groups", "class-vs-group-mean"])
def test_distils_every_method_and_mode(tiny, method, mode):
    images, labels, groups = tiny
    syn = debiasdd.distill(images, labels, groups, method=method, mode=mode, **FAST)
    assert len(syn) == 4 and syn.shape == (3, 8, 8)
    assert syn.images.dtype == np.float32 and np.isfinite(syn.images).all()
    np.testing.assert_array_equal(syn.labels, [0, 0, 1, 1])
    # Only group-wise distillation makes images of groups; FairDD's and COBRA's are per class.
    if mode == "group":
        np.testing.assert_array_equal(syn.groups, [0, 1, 2, 3])
    else:
        np.testing.assert_array_equal(syn.groups, [-1] * 4)
    config = syn.config
    assert config["method"] == method and config["iterations_done"] == 3
    assert config["distill"]["settings"]["mode"] == mode


def test_class_mode_needs_no_groups(tiny):
    images, labels, _ = tiny
    syn = debiasdd.distill(images, labels, mode="class", method="dm", **FAST)
    assert syn.n_attributes == 1
    np.testing.assert_array_equal(syn.groups, [-1] * 4)


def test_same_seed_same_bytes_other_seed_other_images(tiny):
    images, labels, groups = tiny
    a = debiasdd.distill(images, labels, groups, seed=3, **FAST)
    b = debiasdd.distill(images, labels, groups, seed=3, **FAST)
    c = debiasdd.distill(images, labels, groups, seed=4, **FAST)
    assert a.images.tobytes() == b.images.tobytes()
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("method", ["dc", "dm"])
def test_ranks_give_the_same_set(tiny, method):
    images, labels, groups = tiny
    # DC with short loops: in f32 its inner loop amplifies the rounding differences of split
    # passes (ARCHITECTURE.md, "Several ranks").
    fast = {**FAST, "outer_loop": 2, "inner_loop": 1, "iterations": 1} if method == "dc" else FAST
    one = debiasdd.distill(images, labels, groups, method=method, **fast)
    for ranks in (2, 3):
        split = debiasdd.distill(images, labels, groups, method=method, ranks=ranks, **fast)
        scale = np.abs(one.images).max()
        assert np.abs(split.images - one.images).max() <= 1e-6 * scale, ranks
    with pytest.raises(ValueError, match="at least 1 rank"):
        debiasdd.distill(images, labels, groups, ranks=0, **FAST)
    # Host sums are what CPU ranks take under "auto"; NCCL needs one GPU per rank.
    host = debiasdd.distill(images, labels, groups, method=method, ranks=2, collective="host", **fast)
    assert np.array_equal(host.images, debiasdd.distill(images, labels, groups, method=method, ranks=2, **fast).images)
    with pytest.raises(ValueError, match="collective host"):
        debiasdd.distill(images, labels, groups, ranks=2, collective="nccl", **FAST)
    with pytest.raises(ValueError, match="auto, host, nccl"):
        debiasdd.distill(images, labels, groups, ranks=2, collective="mpi", **FAST)


def test_iterations_move_the_images(tiny):
    """The images after 5 iterations are not those after 1 (numerics: the CLI test below)."""
    images, labels, groups = tiny
    one = debiasdd.distill(images, labels, groups, method="dm", **{**FAST, "iterations": 1})
    five = debiasdd.distill(images, labels, groups, method="dm", **{**FAST, "iterations": 5})
    assert np.abs(five.images - one.images).max() > 1e-4
    assert five.config["iterations_done"] == 5


def test_a_split_or_its_arrays_give_the_same_set(cmnist):
    train = cmnist.train
    kwargs = dict(method="dm", ipc=10, iterations=2, width=8, batch_real=4)
    from_split = debiasdd.distill(train, **kwargs)
    from_dataset = debiasdd.distill(cmnist, **kwargs)
    from_arrays = debiasdd.distill(train.images, train.labels, train.groups, **kwargs)
    assert from_split.images.tobytes() == from_dataset.images.tobytes()
    # The arrays' normalisation is computed from floats rather than bytes: equal up to rounding.
    np.testing.assert_allclose(from_arrays.images, from_split.images, atol=1e-4)
    np.testing.assert_allclose(from_arrays.mean, from_split.mean, rtol=1e-6)


@pytest.mark.parametrize("method", ["dc", "dm"])
def test_the_cli_gives_the_same_bytes(cmnist, cli, tmp_path, method):
    data = tmp_path / "data.safetensors"
    cmnist.save(data)
    args = dict(method=method, mode="group", ipc=10, iterations=2, width=8, batch_real=4, seed=5)
    out = tmp_path / "cli.safetensors"
    command = [cli, "distill", "--data", str(data), "--out", str(out)]
    for key, value in args.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(command, check=True, capture_output=True)
    from_cli = debiasdd.load_synthetic(out)
    from_python = debiasdd.distill(debiasdd.load(data), **args)
    assert from_python.images.tobytes() == from_cli.images.tobytes()
    np.testing.assert_array_equal(from_python.groups, from_cli.groups)


def test_progress_every_iteration(tiny):
    images, labels, groups = tiny
    seen = []
    debiasdd.distill(images, labels, groups, progress=seen.append, **{**FAST, "iterations": 4})
    assert [p["iteration"] for p in seen] == [1, 2, 3, 4]
    assert all(p["iterations"] == 4 and p["seconds"] > 0 for p in seen)
    assert all(isinstance(p["loss"], float) and np.isfinite(p["loss"]) for p in seen)


def test_progress_true_prints_a_line(tiny, capsys):
    images, labels, groups = tiny
    debiasdd.distill(images, labels, groups, progress=True, **FAST)
    err = capsys.readouterr().err
    assert "distill: iteration 3/3" in err


class Stop(Exception):
    pass


def test_an_exception_in_the_callback_stops_at_a_checkpoint_and_resume_finishes(tiny, tmp_path):
    images, labels, groups = tiny
    kwargs = dict(FAST, iterations=6, method="dc")
    whole = debiasdd.distill(images, labels, groups, **kwargs)
    ckpt = tmp_path / "run.ckpt.safetensors"
    history = tmp_path / "history.jsonl"

    def stop_at_2(p):
        if p["iteration"] == 2:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        debiasdd.distill(
            images, labels, groups, checkpoint=ckpt, history=history, progress=stop_at_2,
            checkpoint_every=100, **kwargs,
        )
    assert ckpt.exists()
    assert len(history.read_text().splitlines()) == 2
    seen = []
    resumed = debiasdd.distill(
        images, labels, groups, checkpoint=ckpt, resume=True, history=history,
        progress=seen.append, **kwargs,
    )
    assert [p["iteration"] for p in seen] == [3, 4, 5, 6]
    assert resumed.images.tobytes() == whole.images.tobytes()
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2, 3, 4, 5, 6]
    # A checkpoint of other settings is refused, naming why.
    with pytest.raises(ValueError, match="different settings"):
        debiasdd.distill(
            images, labels, groups, checkpoint=ckpt, resume=True, **{**kwargs, "seed": 9}
        )


CHILD = textwrap.dedent(
    """
    import sys, numpy as np, debiasdd
    sys.path.insert(0, {tests!r})
    from conftest import tiny_biased
    images, labels, groups = tiny_biased()
    def report(p):
        print("iteration", p["iteration"], flush=True)
    try:
        debiasdd.distill(images, labels, groups, method="dc", ipc=2, width=8, batch_real=8,
                         iterations=10000, checkpoint={ckpt!r}, progress=report)
    except KeyboardInterrupt as e:
        print("KeyboardInterrupt", *getattr(e, "__notes__", []), flush=True)
        sys.exit(3)
    print("finished", flush=True)
    """
)


def test_ctrl_c_stops_within_an_iteration_and_keeps_a_checkpoint(tmp_path):
    ckpt = tmp_path / "ctrl-c.ckpt.safetensors"
    script = CHILD.format(tests=os.path.dirname(__file__), ckpt=str(ckpt))
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Wait for a few iterations, then interrupt while the Rust loop runs (GIL released).
        for line in child.stdout:
            if line.startswith("iteration 3"):
                child.send_signal(signal.SIGINT)
                break
        rest = child.stdout.read()
        child.wait(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 3, (rest, child.stderr.read())
    assert "KeyboardInterrupt" in rest and "resume=True" in rest, rest
    assert ckpt.exists()
    # The checkpoint holds iteration 3 (the signal came before the next one began) or 4 (it
    # came during iteration 4, which finished): the run stopped within one iteration.
    seen = []
    debiasdd.distill(
        *tiny_biased(), method="dc", ipc=2, width=8, batch_real=8, iterations=6,
        checkpoint=ckpt, resume=True, progress=seen.append,
    )
    assert seen[0]["iteration"] in (4, 5), seen
    assert seen[-1]["iteration"] == 6


def test_the_gil_is_released_while_it_works(tiny):
    """A Python thread keeps running during a distillation: the GIL is held only for the
    moments between iterations."""
    import threading
    import time

    images, labels, groups = tiny
    ticks, done = [], threading.Event()

    def count():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=count)
    thread.start()
    started = time.perf_counter()
    debiasdd.distill(images, labels, groups, method="dc", **{**FAST, "iterations": 10})
    ended = time.perf_counter()
    done.set()
    thread.join()
    during = [t for t in ticks if started < t < ended]
    # Holding the GIL through the run would leave at most a tick or two per iteration.
    assert ended - started > 0.05
    assert len(during) > max(50, 0.2 * (ended - started) / 0.001), (len(during), ended - started)
