"""The problems of ``problems.py`` as fixtures, built once per session (Newton solves and the MLP's
finite differences take a few seconds)."""

from __future__ import annotations

import pytest

import problems as P


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
