"""Set-up shared by the PyTorch peers (plain autograd, TorchOpt, higher, Betty); ``_common.py``
stays numpy-only so that the JAXopt environment can import it too."""

from __future__ import annotations

import argparse
from typing import Any

import _common
import torch

TENSORS = ("X_train", "y_train", "X_val", "y_val", "w_star", "log_lam")


def load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Set torch's threads, read the problem file: ``(problem dict, its arrays as tensors)``."""
    torch.set_num_threads(args.threads)
    prob = _common.load_problem(args.problem, args.alpha)
    return prob, {k: torch.from_numpy(prob[k]) for k in TENSORS}
