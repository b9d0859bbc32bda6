"""The ``udrra`` command line: list, show, verify, ablate, train.

Exit codes: 0 success; 1 ``verify`` found an algorithm off its target; 2 usage or input errors (unknown
algorithm, malformed TOML, invalid composition, bad data), printed as one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .errors import UdrraError

DEFAULT_P, DEFAULT_K = 3, 5


def _overrides(pairs: Optional[List[str]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in pairs or []:
        if "=" not in item:
            raise UdrraError(f"--set expects TABLE.PARAM=VALUE (e.g. target.beta=0.5), got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", metavar="TABLE.PARAM=VALUE",
                   help="override a parameter, e.g. --set target.beta=0.5 (repeatable)")


def cmd_list(args) -> int:
    from . import catalog_names, load
    names = catalog_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:{width}s}  {load(name).summary()}")
    return 0


def cmd_show(args) -> int:
    from . import load
    print(load(args.algorithm, _overrides(args.overrides)).describe())
    return 0


def _fmt_row(xs) -> str:
    return " ".join(f"{x:.4f}" for x in xs)


def cmd_verify(args) -> int:
    from . import Bandit, catalog_names, load, verify
    if args.all == bool(args.algorithms):
        raise UdrraError("give algorithm names/paths or --all (not both)")
    names = catalog_names() if args.all else args.algorithms
    algos = [load(n, _overrides(args.overrides)) for n in names]  # validate everything before training
    bandit = Bandit.random(P=args.prompts, K=args.responses, seed=args.seed)
    # bandit tensors are tiny: one thread avoids OpenMP synchronisation on every op (much slower on a busy machine)
    import torch
    torch.set_num_threads(1)
    failed = 0
    t0 = time.perf_counter()
    if not args.json:
        mode = "sampled mini-batches" if args.sampled else "exact population loss"
        print(f"bandit: P={args.prompts} prompts × K={args.responses} responses, seed {args.seed}; {mode}")
    for algo in algos:
        res = verify(algo, bandit, exact=not args.sampled, seed=args.seed, steps=args.steps)
        failed += not res.passed
        if args.json:
            print(json.dumps(res.to_json()))
            continue
        status = "ok  " if res.passed else "FAIL"
        if res.target is None:
            print(f"{status} {algo.name:12s} {res.target_kind:15s} margin violation {res.margin_violation:.1e} "
                  f"(tol {res.tolerance:.0e})  steps {res.steps}")
        else:
            print(f"{status} {algo.name:12s} {res.target_kind:15s} TV {res.tv:.1e} (tol {res.tolerance:.0e})  "
                  f"KL {res.kl:.1e}  steps {res.steps}")
        for p in range(res.learned.shape[0]):
            if res.target is not None:
                print(f"       x{p} target  {_fmt_row(res.target[p].tolist())}")
            print(f"       x{p} learned {_fmt_row(res.learned[p].tolist())}")
    if not args.json:
        print(f"{len(algos) - failed}/{len(algos)} reached their target ({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


def cmd_ablate(args) -> int:
    from .ablate import load_experiment, run_experiment
    experiments = [load_experiment(path) for path in args.experiments]  # validate every file before running
    if args.output_dir and len(experiments) > 1:
        raise UdrraError("--output-dir takes one experiment file (each experiment writes its own folder)")
    for ex in experiments:
        out = args.output_dir or str(Path(args.results) / ex.name)
        res = run_experiment(ex, out, progress=not args.no_progress, steps=args.steps, seeds=args.seeds)
        print(f"{ex.name}: {len(ex.variants)} variants × {ex.seeds} seeds in {res.seconds:.1f} s -> {out}/")
        for s in res.summary:
            parts = [f"{m} {s[f'{m}_final']:.3g}" for m in ex.metrics]
            print(f"  {s['variant']:28s} " + "  ".join(parts))
        for c in res.claims:
            print(f"  claim {'holds' if c['holds'] else 'DOES NOT hold'}: {c['text']} "
                  f"({c['metric']} {c['measured']:.3g} {c['op']} {c['against']} {c['reference']:.3g})")
    return 0


def cmd_train(args) -> int:
    from . import load
    try:
        from .lm.train import run_from_args
    except ImportError as e:
        raise UdrraError(f"udrra train needs the LM extras: pip install 'udrra[lm]' ({e})") from None
    return run_from_args(args, load(args.algorithm, _overrides(args.overrides)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="udrra", description=(
        "RLHF / preference-learning algorithms as compositions of four loss components "
        "(target, source, reward, reference), verified against their target distributions."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="the catalog, one line each", description="List the shipped algorithms.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="composition, derived loss, target and paper of one algorithm",
                       description="Show an algorithm's composition, its derived loss, its target and paper.")
    p.add_argument("algorithm", metavar="NAME|PATH")
    _add_set(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("verify", help="train on a random bandit and compare with the analytic target",
                       description="Train each algorithm on a default random bandit through its derived loss and "
                                   "compare the learned policy with its analytic target. Exit 1 if any misses "
                                   "its tolerance (TV < 1e-4 exact, < 2e-2 sampled).")
    p.add_argument("algorithms", nargs="*", metavar="NAME|PATH")
    p.add_argument("--all", action="store_true", help="verify the whole catalog")
    p.add_argument("--json", action="store_true", help="one JSON object per algorithm "
                   "(keys algorithm, target, learned, tv, kl, steps, ...)")
    p.add_argument("--sampled", action="store_true", help="sampled mini-batches instead of the exact population loss")
    p.add_argument("--seed", type=int, default=0, help="bandit and sampler seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per round (default 3000 exact, 1000 sampled)")
    p.add_argument("--prompts", type=int, default=DEFAULT_P, help=f"bandit prompts P (default {DEFAULT_P})")
    p.add_argument("--responses", type=int, default=DEFAULT_K, help=f"responses per prompt K (default {DEFAULT_K})")
    _add_set(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("ablate", help="run convergence ablations from an experiment file",
                       description="Run every variant × seed of an experiment file on its bandit testbed and write "
                                   "metrics.csv, summary.csv, PNG figures and report.md (see experiments/).")
    p.add_argument("experiments", nargs="+", metavar="PATH.toml")
    p.add_argument("--output-dir", default=None, help="output folder (default: RESULTS/<experiment name>)")
    p.add_argument("--results", default="results", help="parent folder of the default output (default results)")
    p.add_argument("--steps", type=int, default=None, help="override the file's steps (quick runs)")
    p.add_argument("--seeds", type=int, default=None, help="override the file's seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("train", help="train a language model with a pair-based algorithm",
                       description="Train a causal LM on preference pairs with a pair-based composition "
                                   "(dpo, ipo, cdpo, rdpo, hinge, simpo) through the same loss code.")
    p.add_argument("algorithm", metavar="NAME|PATH")
    _add_set(p)
    try:
        from .lm.train import add_train_arguments
        add_train_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UdrraError as e:
        print(f"udrra: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("udrra: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
