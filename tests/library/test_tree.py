"""The dict-of-tensor algebra."""

from __future__ import annotations

import pytest
import torch

from hypergradients.core import tree


def test_algebra_matches_flat_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    a = {
        "x": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "y": torch.randn(4, generator=g, dtype=torch.float64),
    }
    b = {
        "x": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "y": torch.randn(4, generator=g, dtype=torch.float64),
    }
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert float(tree.dot(a, b)) == pytest.approx(float(fa @ fb), rel=1e-14)
    assert float(tree.norm(a)) == pytest.approx(float(fa.norm()), rel=1e-14)
    assert torch.allclose(tree.flatten(tree.axpy(0.5, a, b)), 0.5 * fa + fb)
    assert torch.allclose(
        tree.flatten(tree.axpy(torch.tensor(0.5, dtype=torch.float64), a, b)), 0.5 * fa + fb
    )
    assert torch.allclose(tree.flatten(tree.sub(a, b)), fa - fb)
    assert torch.allclose(tree.flatten(tree.add(a, b)), fa + fb)
    assert torch.allclose(tree.flatten(tree.scale(a, 3.0)), 3 * fa)
    back = tree.unflatten(fa, a)
    assert all(torch.equal(back[k], a[k]) for k in a)
    assert tree.numel(a) == 10


def test_unflatten_refuses_a_wrong_length() -> None:
    with pytest.raises(ValueError, match="length 5 does not match a tree of 4"):
        tree.unflatten(torch.zeros(5), {"a": torch.zeros(4)})


def test_clone_leaves_never_aliases() -> None:
    a = {"x": torch.ones(2)}
    c = tree.clone_leaves(a, requires_grad=True)
    assert c["x"].requires_grad and c["x"].data_ptr() != a["x"].data_ptr()


def test_nonfinite_detection() -> None:
    t = {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}
    assert tree.first_nonfinite(t) == "b" and not tree.all_finite(t)
    assert tree.first_nonfinite({"a": torch.ones(1)}) is None
