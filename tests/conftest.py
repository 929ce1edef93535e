"""Shared fixtures: the problems of ``tests/problems.py``, built once per session (Newton solves
and the MLP's finite differences take a few seconds)."""

from __future__ import annotations

import pytest
import torch

import problems as P

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread for the test: tiny models run several times slower with two threads
    spinning on a shared 2-core machine, and one thread keeps float results reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ridge() -> P.Problem:
    return P.ridge()


@pytest.fixture(scope="session")
def logistic() -> P.Problem:
    return P.logistic()


@pytest.fixture(scope="session")
def mlp() -> P.Problem:
    return P.mlp()


@pytest.fixture(scope="session", params=["ridge", "logistic", "mlp"])
def problem(request: pytest.FixtureRequest) -> P.Problem:
    return request.getfixturevalue(request.param)
