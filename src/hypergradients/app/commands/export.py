"""``hypergradients export RUN_DIR``: a run's tuned hyperparameters, in natural units, to a plain file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..tuned import Arm, TunedRun

DESCRIPTION = """\
Write the tuned hyperparameters of a finished (or checkpointed) run to a plain file, in their
natural units (decays, not log-decays): per tuned arm, <arm>/hparams.json in the run folder, with
each family's name, kind and parametrisation and each value's key, shape and dtype. A tensor of at
most 1024 numbers is written in the JSON; larger ones (one decay per weight) go to hparams.pt
beside it, a dict of tensors that torch.load(..., weights_only=True) reads. Read them back in Python
with hypergradients.load_hparams(path); the format is described in docs/user-guide.md.

Runs of weight-decay (arms global, layer, weight), overfit-validation (models linear, mlp) and
families (the tuned arm, any family).
The values are those of each arm's last checkpoint (the end of the run when it finished).

examples:
  hypergradients export runs/wd                        # runs/wd/global/hparams.json, runs/wd/weight/...
  hypergradients export runs/wd --arm weight --out tuned.json   # one arm, to tuned.json (+ tuned.pt)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run folder (`hypergradients run ... --out RUN_DIR`)"
    )
    parser.add_argument(
        "--arm",
        dest="arms",
        action="append",
        metavar="ARM",
        help="export this arm (or model) only (repeatable; default: every tuned arm)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        help="where to write (one arm only; default: RUN_DIR/<arm>/hparams.json)",
    )
    parser.add_argument(
        "--experiment",
        metavar="NAME",
        help="the experiment that wrote RUN_DIR, if its config.toml fits several",
    )
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")


def _fail(msg: str, code: int = 2) -> int:
    print(f"hypergradients export: error: {msg}", file=sys.stderr)
    return code


def choose_arms(run: TunedRun, wanted: list[str] | None) -> list[Arm]:
    """The run's arms named in ``wanted`` (all tuned ones when ``None``); ``ValueError`` naming the
    choices."""
    names = [a.name for a in run.arms]
    for w in wanted or []:
        if w not in names:
            why = f" ({run.missing[w]})" if w in run.missing else ""
            raise ValueError(
                f"--arm {w!r}: the run has no tuned arm of that name with a checkpoint{why}; "
                f"its tuned arms are {names}"
            )
    chosen = [a for a in run.arms if wanted is None or a.name in wanted]
    if not chosen:
        why = "; ".join(f"{k}: {v}" for k, v in run.missing.items())
        raise ValueError(
            f"{str(run.folder)!r} has no tuned arm with a checkpoint"
            + (f" ({why})" if why else f": its arms tune nothing ({run.experiment})")
        )
    return chosen


def check_target(path: Path, *, option: str = "--out") -> None:
    """Refuse, before any work, to overwrite a file that is not an export of ours (a JSON of another
    format, or a ``.pt`` beside no export)."""
    import json

    from ...training.export import FORMAT
    from ...training.files import OutputPathError

    if path.suffix != ".json":
        raise OutputPathError(
            f"{option} {str(path)!r}: give a path ending in .json (large tensors go to a .pt beside it)"
        )
    if not path.parent.is_dir():
        raise OutputPathError(f"{option} {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    if path.exists():
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputPathError(
                f"{option} {str(path)!r} exists and is not a file of exported hyperparameters: "
                "move it away, or give another path"
            )
    elif path.with_suffix(".pt").exists():
        raise OutputPathError(
            f"{option} {str(path)!r}: {str(path.with_suffix('.pt'))!r} exists beside it and "
            "the export would overwrite it: move it away, or give another path"
        )


def main(args: argparse.Namespace) -> int:
    from ...training.export import INLINE_MAX, export_hparams
    from ...training.files import OutputPathError, UnreadableFileError, json_dumps
    from ..config import ConfigError
    from ..tuned import open_run

    try:
        if args.out is not None and (args.arms is None or len(args.arms) != 1):
            raise ConfigError("--out writes one arm's values: name the arm with --arm ARM")
        run = open_run(args.run_dir, experiment=args.experiment)
        arms = choose_arms(run, args.arms)
        targets = [Path(args.out) if args.out else a.folder / "hparams.json" for a in arms]
        for t in targets:
            check_target(t)
        tuned = [a.tuned() for a in arms]  # every checkpoint read before anything is written
    except (ConfigError, ValueError, OutputPathError, UnreadableFileError) as e:
        return _fail(str(e))
    written = []
    for arm, target, (_, fams, rnd) in zip(arms, targets, tuned, strict=True):
        meta = {"experiment": run.experiment, "run": str(run.folder), "arm": arm.name, "round": rnd}
        path = export_hparams(fams, target, meta=meta)
        big = any(t.numel() > INLINE_MAX for f in fams for t in f.tensors().values())
        written.append(
            {
                "arm": arm.name,
                "round": rnd,
                "hyperparameters": sum(f.count() for f in fams),
                "file": str(path),
                "tensor_file": str(path.with_suffix(".pt")) if big else None,
            }
        )
    if args.json:
        print(json_dumps({"experiment": run.experiment, "run": str(run.folder), "written": written}))
    else:
        for w in written:
            extra = f" (+ {w['tensor_file']})" if w["tensor_file"] else ""
            print(
                f"{w['arm']}: {w['hyperparameters']:,} hyperparameters of round {w['round']} -> "
                f"{w['file']}{extra}"
            )
    return 0
