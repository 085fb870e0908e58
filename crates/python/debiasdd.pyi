"""debiasdd: debiased dataset distillation on a Rust engine.

Learn a tiny synthetic training set from a large, biased one (DC gradient matching or DM
distribution matching), per class, per (class, attribute) group, FairDD's class-vs-groups or
COBRA's class-vs-group-mean; evaluate it on the unbiased test split; infer groups when the data
has no bias labels. The same engine, files and defaults as the `debiasdd` command line.

Arrays: images are float32 ``N x C x H x W`` pixel values in [0, 1]; labels, attributes and
groups int64 (group = label * n_attributes + attribute, -1 where unknown). Inputs may be
anything ``numpy.asarray`` reads (a CPU torch tensor: ``t.numpy()`` or the tensor itself).

Long calls release the GIL, report progress after every iteration or epoch
(``progress=callable`` gets a dict, ``progress=True`` prints a line on stderr), and stop on
Ctrl-C: KeyboardInterrupt is raised once the work has stopped (a distillation writes its
checkpoint first). Bad input raises ValueError / TypeError / FileNotFoundError with a message
that names the problem and the fix; a diverging run raises FloatingPointError.
"""

from os import PathLike
from typing import Any, Callable, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, PathLike]
_Progress = Union[None, bool, Callable[[dict], Any]]
_Method = Literal["dc", "dm"]
_Mode = Literal["class", "group", "class-vs-groups", "class-vs-group-mean"]

class Split:
    """One split of a Dataset. Every property returns a new array."""

    @property
    def name(self) -> Literal["train", "valid", "test"]: ...
    @property
    def images(self) -> npt.NDArray[np.float32]:
        """Pixel values in [0, 1], N x C x H x W."""
    @property
    def labels(self) -> npt.NDArray[np.int64]:
        """Class labels, N."""
    @property
    def attributes(self) -> npt.NDArray[np.int64]:
        """Bias attributes (colour, ...), N; -1 where unknown."""
    @property
    def groups(self) -> npt.NDArray[np.int64]:
        """label * n_attributes + attribute, N; -1 where the attribute is unknown."""
    @property
    def n_classes(self) -> int: ...
    @property
    def n_attributes(self) -> int: ...
    def __len__(self) -> int: ...

class Dataset:
    """A labelled image dataset with bias attributes and train / valid / test splits."""

    @property
    def train(self) -> Split: ...
    @property
    def valid(self) -> Split:
        """May be empty."""
    @property
    def test(self) -> Split: ...
    @property
    def name(self) -> str: ...
    @property
    def classes(self) -> list[str]:
        """Class names."""
    @property
    def attribute_names(self) -> list[str]:
        """Annotated attribute names."""
    @property
    def n_classes(self) -> int: ...
    @property
    def n_attributes(self) -> int:
        """Annotated attributes per class (the test split's group layout)."""
    @property
    def shape(self) -> Tuple[int, int, int]:
        """(channels, height, width)."""
    @property
    def info(self) -> dict:
        """The dataset's description: name, classes, attributes, shape, how it was made."""
    @property
    def inferred(self) -> Optional[dict]:
        """How the train groups were inferred (debiasdd.infer_groups), or None."""
    def save(self, path: _Path) -> None:
        """Writes the dataset file (safetensors) that debiasdd.load and the CLI read."""

class SyntheticSet:
    """A small training set (distilled, or a subset) with the normalisation it is trained with.

    ``SyntheticSet(images, labels, groups=None)`` makes one from arrays (same forms as
    ``distill``); ``mean`` / ``std`` default to the images' own per-channel statistics (pass the
    real training set's to score a real subset as ``debiasdd subset`` does).
    """

    def __init__(
        self,
        images: npt.ArrayLike,
        labels: npt.ArrayLike,
        groups: Optional[npt.ArrayLike] = None,
        *,
        n_classes: Optional[int] = None,
        n_attributes: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None: ...
    @property
    def images(self) -> npt.NDArray[np.float32]:
        """Pixel space (the real images' [0, 1] scale, not clipped), N x C x H x W."""
    @property
    def labels(self) -> npt.NDArray[np.int64]: ...
    @property
    def groups(self) -> npt.NDArray[np.int64]:
        """-1 for images of no group (a class-wise set)."""
    @property
    def mean(self) -> list[float]: ...
    @property
    def std(self) -> list[float]: ...
    @property
    def n_classes(self) -> int: ...
    @property
    def n_attributes(self) -> int: ...
    @property
    def shape(self) -> Tuple[int, int, int]: ...
    @property
    def config(self) -> Optional[dict]:
        """What made the set (method, settings, iterations done), or None."""
    def save(self, path: _Path) -> None:
        """Writes safetensors: images F32, labels and groups I64 (``safetensors.torch.load_file``
        and ``safetensors.numpy.load_file`` read it), the normalisation in the metadata;
        ``debiasdd evaluate --synthetic`` reads it too."""
    def __len__(self) -> int: ...

def load(path: _Path) -> Dataset:
    """Reads a dataset file (debiasdd generate / import, Dataset.save)."""

def load_synthetic(path: _Path) -> SyntheticSet:
    """Reads a synthetic-set file (SyntheticSet.save, debiasdd distill)."""

def generate(
    mnist_dir: _Path,
    ratio: float,
    seed: int = 0,
    preset: Literal["seed", "fairdd", "grey", "cmnist-bg", "cfmnist-fg", "cfmnist-bg", "cifar10s"] = "seed",
    *,
    dataset: Optional[Literal["mnist", "fashion-mnist"]] = None,
    train_size: Optional[int] = None,
    valid_size: Optional[int] = None,
    jitter: Optional[float] = None,
    verify: bool = True,
) -> Dataset:
    """Builds a benchmark dataset as ``debiasdd generate`` does.

    ``mnist_dir``: the folder of the four IDX files (MNIST, or Fashion-MNIST for the cfmnist
    presets); with ``preset="cifar10s"`` the CIFAR-10 binary archive or its folder. ``ratio``:
    the share of bias-conflicting training images, in [0, 1]. ``verify`` checks the files'
    checksums.
    """

def distill(
    images: Union[npt.ArrayLike, Dataset, Split],
    labels: Optional[npt.ArrayLike] = None,
    groups: Optional[npt.ArrayLike] = None,
    *,
    n_classes: Optional[int] = None,
    n_attributes: Optional[int] = None,
    method: _Method = "dc",
    mode: _Mode = "group",
    ipc: int = 10,
    preset: Literal["quick", "paper"] = "quick",
    iterations: Optional[int] = None,
    init: Optional[Literal["noise", "real"]] = None,
    width: Optional[int] = None,
    depth: Optional[int] = None,
    batch_real: Optional[int] = None,
    outer_loop: Optional[int] = None,
    inner_loop: Optional[int] = None,
    lr_img: Optional[float] = None,
    lr_net: Optional[float] = None,
    distance: Optional[Literal["ours", "mse", "cos"]] = None,
    dsa: Optional[bool] = None,
    seed: int = 0,
    device: str = "cpu",
    ranks: int = 1,
    collective: str = "auto",
    progress: _Progress = None,
    checkpoint: Optional[_Path] = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    history: Optional[_Path] = None,
) -> SyntheticSet:
    """Distils ``ipc`` synthetic images per class from real images, as ``debiasdd distill``.

    ``images``: float32 N x C x H x W in [0, 1] with ``labels`` (and ``groups`` for the group
    modes: label * n_attributes + attribute), or a Dataset (its train split) or Split.
    ``n_classes`` defaults to the largest label + 1, ``n_attributes`` to the one layout the
    groups fit (an error says when it is ambiguous). ``mode``: "class" (vanilla), "group"
    (debiased: one term per group), "class-vs-groups" (FairDD), "class-vs-group-mean" (COBRA).
    ``preset`` sets everything not given (quick: minutes on a laptop CPU; paper: the method's
    protocol); the other keywords are the CLI's options of the same name. ``device``: "cpu",
    "cuda[:N]" (a build with the cuda feature). Same seed and device, same result. ``ranks``:
    split every step's matching terms over that many ranks (threads; one GPU each from
    ``cuda:N`` on, or sharing the CPU), the same set within rounding; ``collective``: how they
    sum, "auto", "host" or "nccl" (a build with the nccl feature).

    ``progress(info)`` is called after every iteration with ``iteration``, ``iterations``,
    ``loss`` and ``seconds``; raising in it stops the run (the exception propagates).
    ``checkpoint``: written every ``checkpoint_every`` iterations, at the end and on Ctrl-C;
    ``resume=True`` continues from it (same settings; ``iterations`` may grow). ``history``:
    one JSON line per iteration.
    """

def evaluate(
    dataset: Dataset,
    synthetic: Union[SyntheticSet, Split],
    *,
    models: int = 2,
    epochs: Optional[int] = None,
    augment: bool = True,
    dsa: bool = False,
    width: int = 128,
    depth: int = 3,
    norm: Literal["instance", "batch", "layer", "group", "none"] = "instance",
    seed: int = 0,
    device: str = "cpu",
    progress: _Progress = None,
    heatmap: Optional[_Path] = None,
) -> dict:
    """Trains ``models`` fresh ConvNets on ``synthetic`` and scores them on ``dataset``'s
    unbiased test split, as ``debiasdd evaluate``.

    Protocol: DC's (1000 epochs with its augmentation, 300 with ``augment=False``), or DSA's
    with ``dsa=True``; ``epochs`` overrides. Returns the CLI report's summary at the top:
    ``accuracy``, ``aligned_accuracy``, ``conflicting_accuracy``, ``worst_group_accuracy``,
    ``deo_max``, ``deo_mean`` (each ``{"mean", "std"}`` over the models, in %; the aligned and
    conflicting ones None when there are no such test images), ``group_accuracy_mean`` (the
    classes x attributes matrix), ``n_runs``; then ``runs`` (per model), ``config``, ``n_train``,
    ``n_test``. ``progress(info)`` gets ``model``, ``models``, ``epoch``, ``epochs``, ``loss``,
    ``accuracy`` after every epoch. ``heatmap``: a PNG of the per-group accuracy.
    """

def infer_groups(
    dataset: Dataset,
    *,
    method: Literal["auto", "prediction", "kmeans", "jtt"] = "auto",
    clusters: Optional[int] = None,
    epochs: Optional[int] = None,
    folds: Optional[int] = None,
    q: Optional[float] = None,
    lr: Optional[float] = None,
    width: Optional[int] = None,
    min_conflicting_share: Optional[float] = None,
    seed: int = 0,
    device: str = "cpu",
    progress: _Progress = None,
    heatmap: Optional[_Path] = None,
) -> Tuple[Dataset, dict]:
    """Infers the train split's groups from its class labels alone, as ``debiasdd
    infer-groups``: cross-fitted bias models (GCE), then groups from their predictions or
    k-means on their features. Returns the dataset with inferred train groups (valid and test
    keep the annotations; ``distill`` and ``evaluate`` take it unchanged) and the report
    (counts, the bias models' accuracy, and, when the data had annotations, the agreement with
    them). ``progress(info)`` gets ``fold``, ``folds``, ``epoch``, ``epochs``, ``loss``,
    ``accuracy`` after every epoch.
    """
