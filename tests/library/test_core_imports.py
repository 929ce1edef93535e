"""The core needs only torch: importing hypergradients, a hypergradient, a HyperOptimizer step and
fit (with a checkpoint and a resume) import none of the `cli` extra's packages, and run with them
made unimportable, numpy included.

What torch 2.13 itself imports: numpy, when it is installed (``import torch`` loads it), plus
sympy and mpmath on first use of some operators. So numpy cannot be forbidden from ``sys.modules``
while it is installed; the second test makes it unimportable instead (torch then warns "Failed to
initialize NumPy" and works), which is the situation of a user who never installed it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# The `cli` extra's import names (and two heavy libraries nobody should pull in by accident).
EXTRA = ("numpy", "matplotlib", "sklearn", "mlxtend", "tqdm", "tomli", "tomli_w", "scipy", "pandas")

CORE_USE = textwrap.dedent("""
    import sys, tempfile
    EXTRA = {extra!r}
    if {block!r}:
        for m in EXTRA:
            sys.modules[m] = None   # `import m` now raises ImportError, as if it were not installed
    import torch
    before = set(sys.modules)
    import hypergradients as hg
    from torch import nn
    torch.manual_seed(0)
    X, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 2, (32,))
    model = nn.Linear(5, 2).to(torch.float64)
    fam = hg.WeightDecay(model)
    inner, outer = hg.make_losses(model, lambda o, t: nn.functional.cross_entropy(o, t), (X, y), (X, y),
                                  penalty=fam.penalty)
    g = hg.hypergradient(outer, inner, hg.module_params(model), fam.tensors(), method=hg.CG(iters=5))
    assert hg.HyperOptimizer(model, [fam], method=hg.CG(iters=5)).step((X, y), (X, y)).applied
    with tempfile.TemporaryDirectory() as d:
        for rounds, resume in ((2, False), (3, True)):
            res = hg.fit(model, [hg.WeightDecay(model, name="wd")], (X, y), (X, y), rounds=rounds,
                         inner_steps=2, method=hg.CG(iters=5), checkpoint_dir=d, resume=resume,
                         eval_sets={{"val": (X, y)}})
    assert res.resumed_from == 2 and len(res.metrics) == 3
    added = sorted({{m.split(".")[0] for m in set(sys.modules) - before}})
    print(" ".join(m for m in added if m in EXTRA and sys.modules.get(m) is not None) or "-")
""")


@pytest.mark.parametrize("block", [False, True], ids=["installed", "unimportable"])
def test_core_imports_nothing_from_the_cli_extra(block: bool) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CORE_USE.format(extra=EXTRA, block=block)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    added = proc.stdout.split()
    # numpy may appear (torch's own submodule imports of an installed numpy); nothing else may.
    assert [m for m in added if m not in ("-", "numpy")] == [], added
    if block:
        assert added == ["-"]
