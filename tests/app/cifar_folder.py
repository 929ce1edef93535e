"""A synthetic CIFAR-10 folder in torchvision's layout (the python batches), for the tests that read one."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from hypergradients.app.datasets import CIFAR10_FILES


def write_cifar_folder(root: Path, per_batch: int = 10) -> dict[str, dict[bytes, object]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in CIFAR10_FILES:
        d: dict[bytes, object] = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, size=per_batch)],
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
        batches[name] = d
    return batches
