"""``hypergradients run EXPERIMENT``: run a registered experiment and write its run folder."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Run a registered experiment (see `hypergradients list`) and write its run folder:
  config.toml     the resolved configuration
  <name>.json     the numbers (weight_decay.json, explain.json, compare.json with compare.md, ...)
  report.md       the report, whose path is printed at the end; figures as *.png beside it
  metrics.jsonl   (the experiments that train) one line per round of every arm, and per arm
                  <arm>/metrics.jsonl and <arm>/checkpoint.pt (model, hyperparameters, optimizer
                  states, RNG, data position)

Settings come from the experiment's defaults, then --smoke, then --config FILE.toml, then
--set key=value (repeatable; values are TOML: 5, 1e-3, true, [64, 64], adam), then --seed and
--threads. Every value, the data it asks for and the paths are checked before any work starts;
a refusal exits with status 2 and writes nothing (a --resume whose checkpoint cannot be read
included). Ctrl-C prints the command that resumes. explain, compare and bench keep no checkpoints
(they recompute): --resume is refused for them, and running one again into the same --out
replaces its files. An --out that holds report.md or metrics.jsonl but no config.toml (not a run
folder: your files), or another experiment's run, is refused.

examples:
  hypergradients run weight-decay
  hypergradients run weight-decay --smoke --out /tmp/wd
  hypergradients run weight-decay --set train.rounds=50 --set arms='["global","weight"]'
  hypergradients run weight-decay --out runs/wd --resume     # continue a killed run
  hypergradients run lstm-dropout --set config=full --set data.root=ptb --dry-run   # count only
  hypergradients run explain --set theorem.steps=[1,10,100]
  hypergradients run compare --smoke --set methods='["CG","Neumann"]'
  hypergradients run bench --smoke --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="registered experiment name (see `hypergradients list`)")
    parser.add_argument(
        "--config", metavar="FILE.toml", help="TOML file of settings (nested tables or dotted keys)"
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="run folder (default: runs/<experiment>-<UTC timestamp>)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoints, bit-for-bit",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where to compute (default cpu; bench: overrides its `device` setting)",
    )
    parser.add_argument("--seed", type=int, help="overrides the `seed` setting")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="overrides the `threads` setting (torch's CPU threads)"
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration that finishes in seconds")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model and the hyperparameter families of each arm, print each "
        "family's count and parametrisation, and stop: nothing is trained or written",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress display and no account: print only the report path (or --json)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log metrics to <out>/tensorboard (needs hypergradients[tensorboard])",
    )


def _fail(msg: str, code: int = 2) -> int:
    print(f"hypergradients run: error: {msg}", file=sys.stderr)
    return code


def _prepare(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path]:
    """Experiment, resolved configuration and run folder; raises ConfigError/KeyError before any work."""
    from ...training.files import check_input_file
    from ..config import ConfigError, read_toml, resolve
    from ..experiments import get

    exp = get(args.experiment)
    extra = {k: v for k, v in (("seed", args.seed), ("threads", args.threads)) if v is not None}
    if args.device is not None and "device" in exp.schema:
        extra["device"] = args.device
    for k in extra:
        if k not in exp.schema:
            raise ConfigError(f"experiment {exp.name!r} has no {k} setting; drop --{k}")
    user_file = read_toml(check_input_file(args.config, option="--config")) if args.config else {}
    requested = resolve(
        exp.schema, smoke=exp.smoke if args.smoke else None, file=user_file, sets=args.sets, extra=extra
    )
    if args.tensorboard and not exp.tensorboard:
        raise ConfigError(
            f"experiment {exp.name!r} logs no per-round metrics for TensorBoard; drop --tensorboard"
        )
    if args.resume and not exp.resumable:
        raise ConfigError(
            f"experiment {exp.name!r} keeps no checkpoints to resume (it recomputes everything "
            "in one go); drop --resume and run it again"
        )
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out DIR, the folder of the run to continue")
        out = Path(args.out)
        saved_path = out / "config.toml"
        if not saved_path.is_file():
            raise ConfigError(
                f"--resume: {str(saved_path)!r} does not exist, so {str(out)!r} holds no run "
                "to continue; drop --resume to start one there"
            )
        saved = resolve(exp.schema, file=read_toml(saved_path))
        changed = bool(args.smoke or user_file or args.sets or extra)
        if changed:
            # Only what was given explicitly must agree with the saved run.
            again = resolve(
                exp.schema,
                file={**saved, **(exp.smoke if args.smoke else {}), **user_file},
                sets=args.sets,
                extra=extra,
            )
            diff = sorted(k for k in saved if again[k] != saved[k])
            if diff:
                raise ConfigError(
                    "a resumed run keeps its configuration, but these settings differ from "
                    f"{str(saved_path)!r}: "
                    + ", ".join(f"{k} ({saved[k]!r} -> {again[k]!r})" for k in diff)
                    + "; drop them, or start a new run with another --out"
                )
        return exp, saved, out
    out = Path(args.out) if args.out else default_out(exp.name, smoke=args.smoke)
    # A run that keeps no checkpoints is recomputed in full, so running it again replaces its files.
    if exp.resumable and out.exists() and (out / "config.toml").exists():
        raise ConfigError(
            f"{str(out)!r} already holds a run; continue it with --resume or choose another --out"
        )
    return exp, requested, out


# Files that runs write at the top of their folder. In a folder holding no config.toml (no run of
# ours) they are the user's own, and a run would overwrite them.
RUN_FILES = ("report.md", "metrics.jsonl")


def check_out_folder(exp: Any, out: Path) -> None:
    """Refuse (:class:`~hypergradients.app.config.ConfigError`), before anything is written, an existing
    ``out`` that a new run of ``exp`` would damage: one with no ``config.toml`` that holds a file runs
    write (:data:`RUN_FILES`), or one whose ``config.toml`` is not a configuration of ``exp`` (another
    experiment's run, or the user's own TOML file), which an experiment that recomputes into the same
    folder would overwrite along with the rest of that run."""
    from ..config import ConfigError, read_toml, resolve

    if not out.is_dir():
        return
    saved = out / "config.toml"
    if not saved.exists():
        theirs = [out / n for n in RUN_FILES if (out / n).exists()]
        if theirs:
            raise ConfigError(
                f"--out {str(out)!r} holds {str(theirs[0])!r} but no config.toml, so it is not "
                f"the folder of a run, and this run would overwrite that file: move the file "
                "away, or give another --out (a new folder)"
            )
        return
    try:
        resolve(exp.schema, file=read_toml(saved))
    except ConfigError as e:
        raise ConfigError(
            f"--out {str(out)!r} holds a config.toml that is not a configuration of "
            f"{exp.name!r} ({e}), so this run would overwrite another run's or your own files "
            "there: give another --out"
        ) from None


def default_out(name: str, *, smoke: bool = False) -> Path:
    """``runs/<name>-<UTC timestamp>`` (``-smoke`` appended for the tiny configuration)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path("runs") / f"{name}-{stamp}{'-smoke' if smoke else ''}"


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The shell command that continues this run (with ``--device``/``--tensorboard``: not settings)."""
    cmd = ["hypergradients", "run", args.experiment, "--out", str(out), "--resume"]
    cmd += ["--device", args.device] if args.device not in (None, "cpu") else []
    cmd += ["--tensorboard"] if args.tensorboard else []
    return shlex.join(cmd)


def execute(
    exp: Any,
    cfg: dict[str, Any],
    out: Path,
    *,
    prog: str,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    tensorboard: bool = False,
    resume_hint: str | None = None,
) -> Any:
    """Run ``exp`` with the resolved ``cfg`` into ``out``: the shared path of ``run`` and its aliases.

    Checks ``out`` (:func:`check_out_folder`, for a new run) and the world (``exp.check``: data,
    sizes, devices) before the folder is made, then runs.
    Returns the :class:`~hypergradients.app.experiments.ExperimentResult`, or an exit status after an
    error line ``prog: error: ...`` on stderr (2: refused before any work, or an unreadable
    checkpoint; 1: the computation failed; 130: interrupted).
    """
    from ..config import ConfigError

    def fail(msg: str, code: int = 2) -> int:
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return code

    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda: no CUDA device is available to torch here; use --device cpu")
    if tensorboard:
        try:
            import torch.utils.tensorboard
        except ImportError:
            return fail(
                "--tensorboard needs the tensorboard package: pip install 'hypergradients[tensorboard]'"
            )
    from ...core.errors import HypergradientError
    from ...training.files import UnreadableFileError
    from ...training.fit import NonFiniteError
    from ..datasets import DataFormatError, DataUnavailableError
    from ..experiments import RunContext

    try:
        if not resume:  # a resume continues the run in out, checked by the caller
            check_out_folder(exp, out)
        # What the configuration asks of the world (the data and its sizes), still before any file.
        data = exp.check(cfg) if exp.check is not None else None
    except ConfigError as e:
        return fail(str(e))
    ctx = RunContext(
        config=cfg,
        out=out,
        device=torch.device(device or "cpu"),
        resume=resume,
        progress=progress,
        tensorboard=tensorboard,
        data=data,
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        return exp.run(ctx)
    except KeyboardInterrupt:
        print(
            "interrupted" + (f"; to continue this run: {resume_hint}" if resume_hint else ""), file=sys.stderr
        )
        return 130
    except UnreadableFileError as e:  # nothing is deleted: the message gives the choices
        return fail(str(e), 2)
    except (NonFiniteError, HypergradientError) as e:
        return fail(str(e), 1)
    except (DataUnavailableError, DataFormatError) as e:
        return fail(str(e), 1)
    except OSError as e:  # --out was checked before the work, but a disk can fill up or a folder vanish
        return fail(f"cannot write into --out {str(out)!r}: {e}", 1)


def dry_run(args: argparse.Namespace) -> int:
    """``--dry-run``: the configuration and its data checked as for a run, then the experiment's own
    description of its models and families printed; no folder is made and nothing is written."""
    from ..config import ConfigError

    try:
        if args.resume:
            raise ConfigError("--dry-run builds a new configuration; drop --resume")
        exp, cfg, _ = _prepare(argparse.Namespace(**{**vars(args), "out": None}))
        if exp.dry_run is None:
            raise ConfigError(
                f"experiment {exp.name!r} has no dry run (it describes no hyperparameter "
                "families before training); drop --dry-run"
            )
        data = exp.check(cfg) if exp.check is not None else None
        print(exp.dry_run(cfg, data))
    except (ConfigError, KeyError) as e:
        return _fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    return 0


def main(args: argparse.Namespace) -> int:
    from ...training.files import OutputPathError, check_output_dir
    from ..config import ConfigError

    if getattr(args, "dry_run", False):
        return dry_run(args)
    try:
        exp, cfg, out = _prepare(args)
        check_output_dir(out)
    except (ConfigError, KeyError, OutputPathError) as e:
        return _fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    res = execute(
        exp,
        cfg,
        out,
        prog="hypergradients run",
        resume=args.resume,
        progress=not args.quiet,
        device=args.device,
        tensorboard=args.tensorboard,
        resume_hint=resume_command(args, out) if exp.resumable else None,
    )
    if isinstance(res, int):
        return res
    from ...training.files import json_dumps
    from ..report import text_table

    if args.json:
        doc = {
            "experiment": exp.name,
            "title": res.title,
            "out": str(res.out),
            "report": str(res.report),
            "columns": res.columns,
            "rows": res.rows,
            "notes": res.notes,
            "wall_s": res.wall_s,
        }
        if res.result is not None:  # explain, compare, bench: the result file's content too
            doc.update(result_file=str(res.result_file), result=res.result)
        print(json_dumps(doc))
    elif args.quiet:
        print(res.report)
    else:
        print(res.title)
        print(res.text if res.text is not None else text_table(res.columns, res.rows))
        for n in res.notes:
            print(f"- {n}")
        print(f"total wall time: {res.wall_s:.1f} s")
        print(f"report: {res.report}")
    return res.exit_code
