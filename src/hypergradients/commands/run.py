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
  metrics.jsonl   one line per round (all arms, tagged); <arm>/metrics.jsonl per arm
  <arm>/checkpoint.pt   model, hyperparameters, optimizer states, RNG and data position
  *.png, report.md      figures and the report, whose path is printed at the end

Settings come from the experiment's defaults, then --smoke, then --config FILE.toml, then
--set key=value (repeatable; values are TOML: 5, 1e-3, true, [64, 64], adam), then --seed and
--threads. Every value, the data it asks for and the paths are checked before any work starts;
a refusal exits with status 2 and writes nothing. Ctrl-C prints the command that resumes.

examples:
  hypergradients run weight-decay
  hypergradients run weight-decay --smoke --out /tmp/wd
  hypergradients run weight-decay --set train.rounds=50 --set arms='["global","weight"]'
  hypergradients run weight-decay --out runs/wd --resume     # continue a killed run
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="registered experiment name (see `hypergradients list`)")
    parser.add_argument("--config", metavar="FILE.toml",
                        help="TOML file of settings (nested tables or dotted keys)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (repeatable)")
    parser.add_argument("--out", metavar="DIR",
                        help="run folder (default: runs/<experiment>-<UTC timestamp>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoints, bit-for-bit")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where to compute (default cpu)")
    parser.add_argument("--seed", type=int, help="overrides the `seed` setting")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="overrides the `threads` setting (torch's CPU threads)")
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration that finishes in seconds")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress display and no account: print only the report path (or --json)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also log metrics to <out>/tensorboard (needs hypergradients[tensorboard])")


def _fail(msg: str, code: int = 2) -> int:
    print(f"hypergradients run: error: {msg}", file=sys.stderr)
    return code


def _prepare(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path]:
    """Experiment, resolved configuration and run folder; raises ConfigError/KeyError before any work."""
    from ..config import ConfigError, read_toml, resolve
    from ..experiments import get
    from ..files import check_input_file

    exp = get(args.experiment)
    extra = {k: v for k, v in (("seed", args.seed), ("threads", args.threads)) if v is not None}
    for k in extra:
        if k not in exp.schema:
            raise ConfigError(f"experiment {exp.name!r} has no {k} setting; drop --{k}")
    user_file = read_toml(check_input_file(args.config, option="--config")) if args.config else {}
    requested = resolve(exp.schema, smoke=exp.smoke if args.smoke else None, file=user_file, sets=args.sets,
                        extra=extra)
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out DIR, the folder of the run to continue")
        out = Path(args.out)
        saved_path = out / "config.toml"
        if not saved_path.is_file():
            raise ConfigError(f"--resume: {str(saved_path)!r} does not exist, so {str(out)!r} holds no run "
                              "to continue; drop --resume to start one there")
        saved = resolve(exp.schema, file=read_toml(saved_path))
        changed = bool(args.smoke or user_file or args.sets or extra)
        if changed:
            # Only what was given explicitly must agree with the saved run.
            again = resolve(exp.schema, file={**saved, **(exp.smoke if args.smoke else {}), **user_file},
                            sets=args.sets, extra=extra)
            diff = sorted(k for k in saved if again[k] != saved[k])
            if diff:
                raise ConfigError("a resumed run keeps its configuration, but these settings differ from "
                                  f"{str(saved_path)!r}: " + ", ".join(f"{k} ({saved[k]!r} -> {again[k]!r})"
                                                                       for k in diff)
                                  + "; drop them, or start a new run with another --out")
        return exp, saved, out
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(args.out) if args.out else Path("runs") / f"{exp.name}-{stamp}{'-smoke' if args.smoke else ''}"
    if out.exists() and (out / "config.toml").exists():
        raise ConfigError(f"{str(out)!r} already holds a run; continue it with --resume or choose "
                          "another --out")
    return exp, requested, out


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The shell command that continues this run (with ``--device``/``--tensorboard``: not settings)."""
    cmd = ["hypergradients", "run", args.experiment, "--out", str(out), "--resume"]
    cmd += ["--device", args.device] if args.device != "cpu" else []
    cmd += ["--tensorboard"] if args.tensorboard else []
    return shlex.join(cmd)


def main(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..files import OutputPathError, check_output_dir

    try:
        exp, cfg, out = _prepare(args)
        check_output_dir(out)
    except (ConfigError, KeyError, OutputPathError) as e:
        return _fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available to torch here; use --device cpu")
    if args.tensorboard:
        try:
            import torch.utils.tensorboard
        except ImportError:
            return _fail("--tensorboard needs the tensorboard package: "
                         "pip install 'hypergradients[tensorboard]'")
    from ..data import DataFormatError, DataUnavailableError
    from ..errors import HypergradientError
    from ..experiments import RunContext
    from ..files import UnreadableFileError, json_dumps
    from ..report import text_table
    from ..train import NonFiniteError

    try:
        # What the configuration asks of the world (the data and its sizes), still before any file.
        data = exp.check(cfg) if exp.check is not None else None
    except ConfigError as e:
        return _fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(config=cfg, out=out, device=torch.device(args.device), resume=args.resume,
                     progress=not args.quiet, tensorboard=args.tensorboard, data=data)
    try:
        res = exp.run(ctx)
    except KeyboardInterrupt:
        print(f"interrupted; to continue this run: {resume_command(args, out)}", file=sys.stderr)
        return 130
    except UnreadableFileError as e:   # nothing is deleted: the message gives the choices
        return _fail(str(e), 2)
    except (NonFiniteError, HypergradientError) as e:
        return _fail(str(e), 1)
    except (DataUnavailableError, DataFormatError) as e:
        return _fail(str(e), 1)
    if args.json:
        print(json_dumps({"experiment": exp.name, "title": res.title, "out": str(res.out),
                          "report": str(res.report), "columns": res.columns, "rows": res.rows,
                          "notes": res.notes, "wall_s": res.wall_s}))
    elif args.quiet:
        print(res.report)
    else:
        print(res.title)
        print(text_table(res.columns, res.rows))
        for n in res.notes:
            print(f"- {n}")
        print(f"total wall time: {res.wall_s:.1f} s")
        print(f"report: {res.report}")
    return 0
