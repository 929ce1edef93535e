"""``hypergradients retrain RUN_DIR``: a fresh model trained with a run's tuned values fixed, on
train and on train+validation, against the tuned run on the test set."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

DESCRIPTION = """\
Retrain each tuned arm of a run from scratch with its final hyperparameters held fixed, the way
the run trained it (the same initial weights, inner optimizer, batch size, batch order and number
of inner steps), and compare the test metrics with the tuned run's own:

  on train       the run's training set: the retrain differs from the tuned run only in using the
                 final values from the first step (the run moved to them while training)
  on train+val   the validation set appended to the training set (the paper's protocol): only
                 values that generalise, rather than fit the validation set, still help the test

Writes retrain.json and report.md into --out (default RUN_DIR/retrain). Runs of weight-decay
(arms global, layer, weight), overfit-validation (models linear, mlp) and families (the tuned arm;
no train+val retrain for example weights, which have none for the validation examples, or for
distilled data, which replaces every training batch).

examples:
  hypergradients retrain runs/wd                        # every tuned arm, on train and on train+val
  hypergradients retrain runs/wd --arm global --on train+val
  hypergradients retrain runs/wd --arm weight --hparams tuned.json   # values from an exported file
"""

ONS: dict[str, tuple[Literal["train", "train+val"], ...]] = {
    "train": ("train",),
    "train+val": ("train+val",),
    "both": ("train", "train+val"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run folder (`hypergradients run ... --out RUN_DIR`)"
    )
    parser.add_argument(
        "--arm",
        dest="arms",
        action="append",
        metavar="ARM",
        help="retrain this arm (or model) only (repeatable; default: every tuned arm)",
    )
    parser.add_argument(
        "--on",
        choices=tuple(ONS),
        default="both",
        help="the training data of the retrain (default both: one retrain on each)",
    )
    parser.add_argument(
        "--hparams",
        metavar="FILE.json",
        help="fix these exported values instead of the arm's final ones (one arm only)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="where retrain.json and report.md go (default RUN_DIR/retrain)"
    )
    parser.add_argument(
        "--experiment",
        metavar="NAME",
        help="the experiment that wrote RUN_DIR, if its config.toml fits several",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to compute (default cpu)"
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch's CPU threads (default: the run's `threads` setting)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the report path (or --json)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _fail(msg: str, code: int = 2) -> int:
    print(f"hypergradients retrain: error: {msg}", file=sys.stderr)
    return code


def _check_out(out: Path) -> None:
    from ...training.files import OutputPathError, check_output_dir

    check_output_dir(out)
    if (out / "report.md").exists() and not (out / "retrain.json").exists():
        raise OutputPathError(
            f"--out {str(out)!r} holds a report.md but no retrain.json, so it is not a folder "
            "this command wrote, and it would overwrite that file: give another --out"
        )


def _se(x: Tensor) -> float:
    return float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")


def main(args: argparse.Namespace) -> int:
    import torch

    from ...training.export import load_hparams
    from ...training.files import OutputPathError, UnreadableFileError, json_dumps, write_atomic
    from ...training.fit import NonFiniteError
    from ...training.retrain import retrain
    from ..config import ConfigError
    from ..report import markdown_table, text_table
    from ..tuned import open_run
    from .export import choose_arms

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available to torch here; use --device cpu")
    if args.threads is not None and args.threads < 1:
        return _fail(f"--threads must be >= 1, got {args.threads}")
    try:
        if args.hparams is not None and (args.arms is None or len(args.arms) != 1):
            raise ConfigError("--hparams holds one arm's values: name the arm with --arm ARM")
        run = open_run(args.run_dir, experiment=args.experiment, device=args.device)
        arms = choose_arms(run, args.arms)
        out = Path(args.out) if args.out else run.folder / "retrain"
        _check_out(out)
        tuned = [a.tuned() for a in arms]  # every file read before any work
        given = load_hparams(args.hparams) if args.hparams is not None else None
        if given is not None:
            given.check(tuned[0][1])
    except (ConfigError, ValueError, KeyError, OutputPathError, UnreadableFileError) as e:
        return _fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    from ..experiments.base import threads
    from ..experiments.shared import correct, paired_se, per_example, versus

    train, val, test = run.train, run.val, run.test
    ce = torch.nn.functional.cross_entropy
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        with threads(args.threads or int(run.config.get("threads", 1))):
            for arm, (model, fams, rnd) in zip(arms, tuned, strict=True):
                steps = arm.steps(rnd)
                loss_t = per_example(model, *test, lambda o, y: ce(o, y, reduction="none"))
                acc_t = per_example(model, *test, correct)
                count = sum(f.count() for f in fams)
                rows.append(
                    {
                        "arm": arm.name,
                        "trained": f"tuned run (round {rnd})",
                        "hyperparameters": count,
                        "steps": steps,
                        "test_loss": float(loss_t.mean()),
                        "test_acc": float(acc_t.mean()),
                        "test_loss_se": _se(loss_t),
                        "vs_tuned": None,
                        "paired_se": None,
                    }
                )
                for on in ONS[args.on]:
                    why = _no_train_val(fams) if on == "train+val" else None
                    if why is not None:
                        notes.append(f"{arm.name}: no retrain on train+val: {why}.")
                        continue
                    if not args.quiet and not args.json:
                        print(f"{arm.name}: retraining on {on} ({steps} steps) ...", file=sys.stderr)
                    res = retrain(
                        arm.model,
                        fams,
                        train,
                        val,
                        values=given,
                        on=on,
                        steps=steps,
                        optimizer=arm.optimizer,
                        batch_size=arm.batch_size,
                        seed=arm.seed,
                    )
                    loss_r = per_example(res.model, *test, lambda o, y: ce(o, y, reduction="none"))
                    acc_r = per_example(res.model, *test, correct)
                    d, se = float(loss_r.mean() - loss_t.mean()), paired_se(loss_r, loss_t)
                    rows.append(
                        {
                            "arm": arm.name,
                            "trained": f"retrain on {on}",
                            "hyperparameters": count,
                            "steps": steps,
                            "test_loss": float(loss_r.mean()),
                            "test_acc": float(acc_r.mean()),
                            "test_loss_se": _se(loss_r),
                            "vs_tuned": d,
                            "paired_se": se,
                        }
                    )
                    notes.append(
                        _note(
                            arm.name,
                            on,
                            d,
                            _se(loss_t),
                            len(loss_t),
                            versus(
                                "the retrain",
                                "the tuned run",
                                float(loss_r.mean()),
                                float(loss_t.mean()),
                                se,
                                metric="test loss",
                                higher_is_better=False,
                                se_what="paired standard error over the test examples",
                                no_se="no standard error: too few test examples",
                            ).text,
                        )
                    )
    except NonFiniteError as e:
        return _fail(str(e), 1)
    columns = ["arm", "trained", "hyperparameters", "steps", "test_loss", "test_acc", "vs_tuned", "paired_se"]
    title = f"retrain: the tuned values of {run.experiment} fixed, on {args.on}"
    result = {
        "experiment": run.experiment,
        "run": str(run.folder),
        "on": args.on,
        "hparams": args.hparams,
        "rows": rows,
        "notes": notes,
        "wall_s": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "retrain.json", json_dumps(result))
    body = [
        f"# {title}",
        "",
        f"Run: `{run.folder}` ({run.experiment}). Each retrain starts from the run's initial weights and "
        "takes as many inner steps, with the same inner optimizer, batch size and batch order, as the tuned "
        "run did to its checkpoint; its hyperparameters are the "
        + ("values of `" + str(args.hparams) + "`" if args.hparams else "arm's final values")
        + ", fixed from the first step. `on train+val` appends the validation set to the training data. "
        "`vs_tuned`: the retrain's test loss minus the tuned run's; `paired_se`: its standard error over "
        "the test examples.",
        "",
        markdown_table(columns, rows),
        "",
        "## What it shows",
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    report = write_atomic(out / "report.md", "\n".join(body))
    if args.json:
        print(json_dumps({**result, "report": str(report), "out": str(out)}))
    elif args.quiet:
        print(report)
    else:
        print(title)
        print(text_table(columns, rows))
        for n in notes:
            print(f"- {n}")
        print(f"report: {report}")
    return 0


def _no_train_val(fams: list[Any]) -> str | None:
    """Why a retrain on train+val means nothing for these families (``None``: it does)."""
    from ...hparams import ExampleWeights
    from ...hparams.distill import DistilledData

    for f in fams:
        if isinstance(f, ExampleWeights):
            return f"the example weights {f.name!r} have no weight for the validation examples"
        if isinstance(f, DistilledData):
            return f"the distilled data {f.name!r} replaces every training batch: it would be the train run"
    return None


def _note(arm: str, on: str, d: float, se_tuned: float, n: int, paired: str) -> str:
    """Whether the retrain reproduces the tuned run's test loss within that loss's own noise (two of its
    standard errors over the test examples), then the paired comparison's words."""
    if not math.isfinite(se_tuned):
        return f"{arm}, retrained on {on}: {paired}."
    within = abs(d) <= 2 * se_tuned
    return (
        f"{arm}, retrained on {on}: the test loss differs from the tuned run's by {d:+.3g}, "
        + ("within" if within else "beyond")
        + f" two standard errors of the tuned run's test loss "
        f"({se_tuned:.2g} over {n} test examples): "
        + ("it reproduces the tuned run within that noise" if within else "no reproduction within that noise")
        + f". Paired over the same examples, {paired}."
    )
