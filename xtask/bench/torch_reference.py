#!/usr/bin/env python3
"""PyTorch (CPU, float32) reference timings for `cargo xtask bench`.

Times the same work as the candle criterion bench `crates/model/benches/convnet.rs`, plus one
step of Dataset Condensation's gradient matching, and prints one JSON object to stdout:

    {"torch_version": "...", "threads": 2, ..., "results": {"<benchmark id>": ms, ...}}

Benchmark ids (median milliseconds per call) for each width W in (128, 32):

  convnet_wW_b256_cpu/forward           forward in train mode, autograd on (as in training)
  convnet_wW_b256_cpu/forward_nograd    the same forward under torch.no_grad()
  convnet_wW_b256_cpu/forward_backward  forward + cross-entropy + loss.backward()
  dc_matching_wW/one_class              DC's inner step for one class: gradients of a real batch
                                        of 256 and of 10 synthetic images, the layer-wise cosine
                                        distance between them ("ours"), and its backward to the
                                        synthetic images (double backward)

and, at width 32, one whole DC iteration of debiasdd's quick preset, written as the official
DC code writes it (a Python loop over matching terms, each with its own forward passes):

  dc_iteration_quick_w32/class          fresh network; 5 outer steps of {for each class: real
                                        batch of 64, g_real, g_syn of its 10 synthetic images,
                                        distance}, one SGD step (lr 0.1, momentum 0.5) on the
                                        synthetic images, then 10 epochs of SGD (lr 0.01, batch
                                        256) on the synthetic set (not after the last step)
  dc_iteration_quick_w32/group          the same over the 100 (class, colour) groups: real batch
                                        of min(16, group size), one synthetic image per group

and one whole DM iteration of debiasdd's quick preset, written as the official `main_DM.py`
writes it (a loop over matching terms; real embeddings under no gradient, `.detach()`):

  dm_iteration_quick_w32/class          fresh network (parameters frozen); for each class: real
                                        batch of 256, mean embedding of it and of the class's 10
                                        synthetic images, squared distance summed; one SGD step
                                        (lr 1.0, momentum 0.5) on the synthetic images
  dm_iteration_quick_w32/group          the same over the (class, colour) groups: real batch of
                                        min(64, group size), one synthetic image per group

With --paper-iteration only the paper preset's iteration is timed (width 128, ipc 10, 10 outer
steps, 50 inner epochs, real batch 256 in both modes, ratio 0.1 as `xtask/gpu/check.sh` uses):

  dc_iteration_paper_w128/class, dc_iteration_paper_w128/group

and DM's paper iteration (width 128, real batch 256 per term, ratio 0.1):

  dm_iteration_paper_w128/class, dm_iteration_paper_w128/group

--device cuda runs everything selected on the GPU (ids then end in `_cuda` instead of `_cpu`;
timings synchronise the device). PyTorch's defaults are kept: cuDNN convolutions may use TF32
(torch.backends.cudnn.allow_tf32), matmuls do not; the output echoes both.

The network is DC's ConvNet (VICO-UoE/DatasetCondensation, networks.py) with the defaults of
debiasdd: 3 blocks of conv3x3(W) -> GroupNorm(W, W) (DC's "instancenorm") -> ReLU -> avgpool 2x2,
then linear(W*4*4 -> 10). The first conv pads by 3 so that a 28x28 input becomes 32x32 (whatever
the channel count, as in debiasdd), giving 32 -> 16 -> 8 -> 4. Inputs are 3x28x28.

Progress goes to stderr. Only the standard library and torch are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from typing import Callable

# The CUDA wheel of torch warns at import when numpy is absent; numpy is not needed here.
warnings.filterwarnings("ignore", message=".*Failed to initialize NumPy.*")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BATCH = 256
CHANNELS = 3
IMAGE = 28
CLASSES = 10
DEPTH = 3
SYN_PER_CLASS = 10
WIDTHS = (128, 32)
# Environment variables that change how the CPU kernels run; echoed into the output.
ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "RAYON_NUM_THREADS",
)


def conv_net(width: int) -> nn.Sequential:
    """DC's ConvNet (instancenorm, relu, avgpooling, depth 3) for 3x28x28 inputs."""
    layers: list[nn.Module] = []
    in_channels = CHANNELS
    size = IMAGE
    for d in range(DEPTH):
        padding = 3 if d == 0 else 1
        layers += [
            nn.Conv2d(in_channels, width, kernel_size=3, padding=padding),
            nn.GroupNorm(width, width, eps=1e-5, affine=True),
            nn.ReLU(inplace=True),  # as in DC
            nn.AvgPool2d(kernel_size=2, stride=2),
        ]
        size = (size + 2 * padding - 2) // 2
        in_channels = width
    if size != 4:
        raise AssertionError(f"expected 4x4 final feature maps, got {size}x{size}")
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * size * size, CLASSES))


def distance_wb(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
    """DC's layer-wise distance ("ours"): sum over output units of 1 - cos, 1-D tensors skipped."""
    shape = gwr.shape
    if len(shape) == 1:
        return torch.zeros((), dtype=gwr.dtype, device=gwr.device)
    gwr = gwr.reshape(shape[0], -1)
    gws = gws.reshape(shape[0], -1)
    cos = torch.sum(gwr * gws, dim=-1) / (
        torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001
    )
    return torch.sum(1 - cos)


def match_loss(gw_syn: list[torch.Tensor], gw_real: list[torch.Tensor]) -> torch.Tensor:
    dis = torch.zeros((), device=gw_real[0].device)
    for gwr, gws in zip(gw_real, gw_syn):
        dis = dis + distance_wb(gwr, gws)
    return dis


# The quick iteration's group sizes are those of the candle bench's split: 45,000 images, ratio
# 0.01 of bias-conflicting samples spread over the other nine colours.
QUICK_ITERATION = dict(outer_loop=5, inner_loop=10, lr_img=0.1, momentum_img=0.5, lr_net=0.01,
                       batch_train=256, width=32, batch_real={"class": 64, "group": 16},
                       conflict_ratio=0.01)
# debiasdd's paper preset at ipc 10 (DC's loops for ipc 10), on a split with ratio 0.1.
PAPER_ITERATION = dict(outer_loop=10, inner_loop=50, lr_img=0.1, momentum_img=0.5, lr_net=0.01,
                       batch_train=256, width=128, batch_real={"class": 256, "group": 256},
                       conflict_ratio=0.1)
SPLIT_SIZE = 45_000
# debiasdd's DM presets (the official main_DM.py values for the images' optimiser).
DM_QUICK_ITERATION = dict(lr_img=1.0, momentum_img=0.5, width=32,
                          batch_real={"class": 256, "group": 64}, conflict_ratio=0.01)
DM_PAPER_ITERATION = dict(lr_img=1.0, momentum_img=0.5, width=128,
                          batch_real={"class": 256, "group": 256}, conflict_ratio=0.1)


def biased_split(
    generator: torch.Generator, conflict_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images with Colored-MNIST-like labels and group ids (class * 10 + colour), on the
    CPU."""
    images = torch.rand(SPLIT_SIZE, CHANNELS, IMAGE, IMAGE, generator=generator)
    labels = torch.arange(SPLIT_SIZE) % CLASSES
    shift = torch.randint(1, CLASSES, (SPLIT_SIZE,), generator=generator)
    conflicting = torch.rand(SPLIT_SIZE, generator=generator) < conflict_ratio
    colours = torch.where(conflicting, (labels + shift) % CLASSES, labels)
    return images, labels, labels * CLASSES + colours


def dc_iteration(
    mode: str, generator: torch.Generator, q: dict, device: torch.device
) -> Callable[[], object]:
    """One DC iteration (see the module docs) in `mode` ("class" or "group") with the settings
    `q` (QUICK_ITERATION or PAPER_ITERATION). The index bookkeeping stays on the CPU, as in DC."""
    images, labels, groups = biased_split(generator, q["conflict_ratio"])
    images = images.to(device)
    batch_real = q["batch_real"][mode]
    if mode == "class":
        keys, key_of = list(range(CLASSES)), labels
        syn_per_term = SYN_PER_CLASS
    else:
        keys, key_of = list(range(CLASSES * CLASSES)), groups
        syn_per_term = SYN_PER_CLASS // CLASSES  # one image per (class, colour)
    members = {k: torch.nonzero(key_of == k).flatten() for k in keys}
    keys = [k for k in keys if len(members[k]) > 0]  # an empty group contributes nothing
    term_class = {k: (k if mode == "class" else k // CLASSES) for k in keys}
    syn = torch.randn(len(keys) * syn_per_term, CHANNELS, IMAGE, IMAGE, generator=generator)
    syn = syn.to(device).requires_grad_(True)
    syn_labels = torch.tensor([term_class[k] for k in keys]).repeat_interleave(syn_per_term)
    syn_labels = syn_labels.to(device)
    optimizer_img = torch.optim.SGD([syn], lr=q["lr_img"], momentum=q["momentum_img"])

    def run() -> object:
        net = conv_net(q["width"]).to(device).train()
        params = list(net.parameters())
        optimizer_net = torch.optim.SGD(net.parameters(), lr=q["lr_net"])
        for ol in range(q["outer_loop"]):
            loss = torch.zeros((), device=device)
            for t, k in enumerate(keys):
                idx = members[k]
                pick = idx[torch.randperm(len(idx), generator=generator)[:batch_real]]
                img_real = images[pick.to(device)]
                lab_real = torch.full((len(pick),), term_class[k], dtype=torch.long, device=device)
                gw_real = torch.autograd.grad(F.cross_entropy(net(img_real), lab_real), params)
                gw_real = [g.detach().clone() for g in gw_real]
                img_syn = syn[t * syn_per_term : (t + 1) * syn_per_term]
                lab_syn = syn_labels[t * syn_per_term : (t + 1) * syn_per_term]
                gw_syn = torch.autograd.grad(
                    F.cross_entropy(net(img_syn), lab_syn), params, create_graph=True
                )
                loss = loss + match_loss(gw_syn, gw_real)
            optimizer_img.zero_grad()
            loss.backward()
            optimizer_img.step()
            if ol == q["outer_loop"] - 1:
                break
            train_x, train_y = syn.detach().clone(), syn_labels
            for _ in range(q["inner_loop"]):
                order = torch.randperm(len(train_x), generator=generator).to(device)
                for start in range(0, len(order), q["batch_train"]):
                    b = order[start : start + q["batch_train"]]
                    optimizer_net.zero_grad()
                    F.cross_entropy(net(train_x[b]), train_y[b]).backward()
                    optimizer_net.step()
        return loss

    return run


def terms_of(mode: str, labels: torch.Tensor, groups: torch.Tensor):
    """The matching terms of `mode`: their keys (classes or non-empty groups), the members of
    each, its class and its number of synthetic images (10 per class, or 1 per group)."""
    if mode == "class":
        keys, key_of, syn_per_term = list(range(CLASSES)), labels, SYN_PER_CLASS
    else:
        keys, key_of = list(range(CLASSES * CLASSES)), groups
        syn_per_term = SYN_PER_CLASS // CLASSES
    members = {k: torch.nonzero(key_of == k).flatten() for k in keys}
    keys = [k for k in keys if len(members[k]) > 0]
    term_class = {k: (k if mode == "class" else k // CLASSES) for k in keys}
    return keys, members, term_class, syn_per_term


def dm_iteration(
    mode: str, generator: torch.Generator, q: dict, device: torch.device
) -> Callable[[], object]:
    """One DM iteration as `main_DM.py` (ConvNet branch, no DSA): a fresh network whose
    parameters do not require gradients; per term the mean embedding of a real batch
    (detached) against that of the term's synthetic images; one SGD step on the images."""
    images, labels, groups = biased_split(generator, q["conflict_ratio"])
    images = images.to(device)
    batch_real = q["batch_real"][mode]
    keys, members, _, syn_per_term = terms_of(mode, labels, groups)
    syn = torch.randn(len(keys) * syn_per_term, CHANNELS, IMAGE, IMAGE, generator=generator)
    syn = syn.to(device).requires_grad_(True)
    optimizer_img = torch.optim.SGD([syn], lr=q["lr_img"], momentum=q["momentum_img"])

    def run() -> object:
        net = conv_net(q["width"]).to(device).train()
        for param in net.parameters():
            param.requires_grad = False
        embed = net[:-1]  # the features entering the classifier (flattened)
        loss = torch.zeros((), device=device)
        for t, k in enumerate(keys):
            idx = members[k]
            pick = idx[torch.randperm(len(idx), generator=generator)[:batch_real]]
            img_real = images[pick.to(device)]
            img_syn = syn[t * syn_per_term : (t + 1) * syn_per_term]
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss = loss + torch.sum(
                (torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2
            )
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        return loss

    return run


def median_ms(fn: Callable[[], object], runs: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `fn` in milliseconds over `runs` calls after `warmup` calls; on a GPU
    each call ends when its queued work has finished."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cases(width: int, device: torch.device) -> dict[str, object]:
    """The timed closures for one width, keyed by benchmark id (a DC iteration as the
    arguments of `dc_iteration`, built only when selected)."""
    torch.manual_seed(0)
    net = conv_net(width).to(device).train()
    params = list(net.parameters())
    images = torch.rand(BATCH, CHANNELS, IMAGE, IMAGE).to(device)
    labels = (torch.arange(BATCH) % CLASSES).to(device)
    # One class of DC: a real batch of that class and its synthetic images.
    real = torch.rand(BATCH, CHANNELS, IMAGE, IMAGE).to(device)
    real_labels = torch.zeros(BATCH, dtype=torch.long, device=device)
    syn = torch.randn(SYN_PER_CLASS, CHANNELS, IMAGE, IMAGE).to(device).requires_grad_(True)
    syn_labels = torch.zeros(SYN_PER_CLASS, dtype=torch.long, device=device)

    def forward() -> object:
        return net(images)

    def forward_nograd() -> object:
        with torch.no_grad():
            return net(images)

    def forward_backward() -> object:
        net.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        return loss

    def dc_matching() -> object:
        loss_real = F.cross_entropy(net(real), real_labels)
        gw_real = torch.autograd.grad(loss_real, params)
        gw_real = [g.detach().clone() for g in gw_real]
        loss_syn = F.cross_entropy(net(syn), syn_labels)
        gw_syn = torch.autograd.grad(loss_syn, params, create_graph=True)
        loss = match_loss(gw_syn, gw_real)
        syn.grad = None
        net.zero_grad(set_to_none=True)
        loss.backward()  # as DC: into the synthetic images (and the net's .grad, unused)
        if syn.grad is None or not torch.isfinite(syn.grad).all():
            raise AssertionError("no finite gradient reached the synthetic images")
        return loss

    group = f"convnet_w{width}_b{BATCH}_{device.type}"
    out = {
        f"{group}/forward": forward,
        f"{group}/forward_nograd": forward_nograd,
        f"{group}/forward_backward": forward_backward,
        f"dc_matching_w{width}/one_class": dc_matching,
    }
    if width == QUICK_ITERATION["width"]:
        generator = torch.Generator().manual_seed(0)
        for mode in ("class", "group"):
            # Built lazily: the split takes a moment and memory only when the id is selected.
            out[f"dc_iteration_quick_w{width}/{mode}"] = (mode, generator, QUICK_ITERATION, device)
            out[f"dm_iteration_quick_w{width}/{mode}"] = (
                dm_iteration, mode, generator, DM_QUICK_ITERATION, device)
    return out


def paper_cases(device: torch.device) -> dict[str, object]:
    """The paper preset's DC iteration, class-wise and group-wise (as `dc_iteration` arguments)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    width = PAPER_ITERATION["width"]
    out: dict[str, object] = {
        f"dc_iteration_paper_w{width}/{mode}": (mode, generator, PAPER_ITERATION, device)
        for mode in ("class", "group")
    }
    for mode in ("class", "group"):
        out[f"dm_iteration_paper_w{width}/{mode}"] = (
            dm_iteration, mode, generator, DM_PAPER_ITERATION, device)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed calls per benchmark (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--filter", default=None, help="regex: only ids it matches (re.search)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default os.cpu_count())"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--paper-iteration",
        action="store_true",
        help="time only the paper preset's DC iteration (class and group; slow on a CPU)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, not {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    pattern = re.compile(args.filter) if args.filter else None
    device = torch.device(args.device)

    if args.paper_iteration:
        selected = [paper_cases(device)]
    else:
        selected = [cases(width, device) for width in WIDTHS]
    results: dict[str, float] = {}
    for table in selected:
        for name, fn in table.items():
            if pattern and not pattern.search(name):
                continue
            if isinstance(fn, tuple):
                fn = fn[0](*fn[1:]) if callable(fn[0]) else dc_iteration(*fn)
            ms = median_ms(fn, args.runs, args.warmup, device)
            results[name] = round(ms, 3)
            print(f"torch: {name}: {ms:.2f} ms (median of {args.runs})", file=sys.stderr)

    report = {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "runs": args.runs,
        "warmup": args.warmup,
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "device": args.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "results": results,
    }
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
