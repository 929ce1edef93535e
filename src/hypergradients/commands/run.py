"""``hypergradients run EXPERIMENT``: run a registered experiment and write its run folder."""

from __future__ import annotations

import argparse
import json
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
--set key=value (repeatable; values are TOML: 5, 1e-3, true, [64, 64], adam), then --seed.
Every value is checked before any work starts.

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
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration that finishes in seconds")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; print only the report path")
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

    exp = get(args.experiment)
    extra = {"seed": args.seed} if args.seed is not None else {}
    if "seed" in extra and "seed" not in exp.schema:
        raise ConfigError(f"experiment {exp.name!r} has no seed setting")
    user_file = read_toml(args.config) if args.config else {}
    requested = resolve(exp.schema, smoke=exp.smoke if args.smoke else None, file=user_file, sets=args.sets,
                        extra=extra)
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out DIR, the folder of the run to continue")
        out = Path(args.out)
        saved_path = out / "config.toml"
        if not saved_path.exists():
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


def main(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    try:
        exp, cfg, out = _prepare(args)
    except (ConfigError, KeyError) as e:
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
    from ..experiments import RunContext
    from ..report import text_table
    from ..train import NonFiniteError

    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(config=cfg, out=out, device=torch.device(args.device), resume=args.resume,
                     progress=not args.quiet, tensorboard=args.tensorboard)
    try:
        res = exp.run(ctx)
    except NonFiniteError as e:
        return _fail(str(e), 1)
    except (DataUnavailableError, DataFormatError) as e:
        return _fail(str(e), 1)
    if args.json:
        print(json.dumps({"experiment": exp.name, "out": str(res.out), "report": str(res.report),
                          "columns": res.columns, "rows": res.rows, "notes": res.notes,
                          "wall_s": res.wall_s}))
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
