"""The ``udrra`` command line: list, show, verify, ablate, train, train-rm.

Exit codes: 0 success; 1 ``verify`` found an algorithm off its target; 2 usage or input errors (unknown
algorithm, malformed TOML, invalid composition, bad data), printed as one line on stderr; 3 a training run
stopped on a non-finite loss or gradient (:class:`udrra.errors.TrainingError`); 128 + the signal number (130 for
Ctrl-C, 143 for SIGTERM) when ``udrra train`` was interrupted and saved a checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .errors import RunInterrupted, TrainingError, UdrraError

DEFAULT_P, DEFAULT_K = 3, 5
#: the default sequence testbed (``udrra verify --testbed sequence``): 2 prompts, V = 3 (EOS + 2 tokens), L = 3,
#: i.e. 15 responses and 7 states per prompt (the whole catalog verifies in ~10 s on one core)
DEFAULT_SEQ_P, DEFAULT_VOCAB, DEFAULT_MAX_LEN = 2, 3, 3


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


def _result_line(name: str, res, w_name: int, w_kind: int) -> str:
    """One verify result: TV and KL to the target, or for a set-valued (hinge) target the number it is judged on."""
    status = "ok  " if res.passed else "FAIL"
    head = f"{status} {name:{w_name}s} {res.target_kind:{w_kind}s}"
    if res.target is None:
        what = "objective gap" if res.target_kind == "hinge_lp" else "margin violation"
        return f"{head} {what} {res.margin_violation:.1e} (tol {res.tolerance:.0e})  steps {res.steps}"
    return f"{head} TV {res.tv:.1e} (tol {res.tolerance:.0e})  KL {res.kl:.1e}  steps {res.steps}"


def _fmt_row(xs) -> str:
    return " ".join(f"{x:.4f}" for x in xs)


def _response_text(y, eos: int) -> str:
    """A response as letters, EOS as '$' (V = 3: (0, 1, 2) -> 'ab$')."""
    return "".join("$" if t == eos else chr(ord("a") + t) if t < 26 else f"<{t}>" for t in y)


def _verify_sequence(args, algos) -> int:
    """``udrra verify --testbed sequence``: the exact sequence testbed (udrra.sequence)."""
    from . import SequenceBandit, verify
    import torch
    P = DEFAULT_SEQ_P if args.prompts is None else args.prompts
    sb = SequenceBandit.random(P=P, vocab=args.vocab, max_len=args.max_len, seed=args.seed)
    torch.set_num_threads(1)
    responses = sb.responses(0)
    failed = skipped = 0
    t0 = time.perf_counter()
    if not args.json:
        mode = "sampled mini-batches" if args.sampled else "exact population loss"
        print(f"sequence testbed: P={P} prompts, vocab V={sb.V} (EOS = {sb.eos}), max_len L={sb.L}: N={sb.N} "
              f"responses and S={sb.states_per_prompt} states per prompt, seed {args.seed}; {mode}")
        print("       responses  " + " ".join(f"{_response_text(y, sb.eos):>6s}" for y in responses))
    for algo in algos:
        res = verify(algo, sb, exact=not args.sampled, seed=args.seed, steps=args.steps)
        none = res.target_kind == "none"
        skipped += none
        failed += not none and not res.passed
        if args.json:
            obj = res.to_json()
            obj["testbed"] = {"kind": "sequence", "prompts": P, "vocab": sb.V, "max_len": sb.L, "eos": sb.eos,
                              "seed": args.seed}
            obj["prompts"] = [{"responses": [list(y) for y in responses], "pi_ref": sb.pi_ref_seq[p].tolist(),
                               "reward": sb.reward[p].tolist(),
                               "target": None if res.target is None else res.target[p].tolist(),
                               "learned": res.learned[p].tolist()} for p in range(P)]
            print(json.dumps(obj))
            continue
        if none:
            print(f"none {algo.name:13s} no target on sequences: {res.note}")
            continue
        print(_result_line(algo.name, res, 13, 21))
        for p in range(P):
            if res.target is not None:
                print(f"       x{p} target  " + " ".join(f"{x:6.4f}" for x in res.target[p].tolist()))
            print(f"       x{p} learned " + " ".join(f"{x:6.4f}" for x in res.learned[p].tolist()))
    if not args.json:
        done = len(algos) - skipped
        print(f"{done - failed}/{done} reached their target, {skipped} without a derived target "
              f"({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


def cmd_verify(args) -> int:
    from . import Bandit, catalog_names, load, verify
    if args.all == bool(args.algorithms):
        raise UdrraError("give algorithm names/paths or --all (not both)")
    names = catalog_names() if args.all else args.algorithms
    algos = [load(n, _overrides(args.overrides)) for n in names]  # validate everything before training
    if args.testbed == "sequence":
        return _verify_sequence(args, algos)
    if args.prompts is None:
        args.prompts = DEFAULT_P
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
        print(_result_line(algo.name, res, 13, 15))
        for p in range(res.learned.shape[0]):
            if res.target is not None:
                print(f"       x{p} target  {_fmt_row(res.target[p].tolist())}")
            print(f"       x{p} learned {_fmt_row(res.learned[p].tolist())}")
    if not args.json:
        print(f"{len(algos) - failed}/{len(algos)} reached their target ({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


def cmd_ablate(args) -> int:
    from .ablate import claim_line, load_experiment, report_from_results, run_experiment
    experiments = [load_experiment(path) for path in args.experiments]  # validate every file before running
    if args.output_dir and len(experiments) > 1:
        raise UdrraError("--output-dir takes one experiment file (each experiment writes its own folder)")
    if args.report_only and args.seeds is not None:
        raise UdrraError("--report-only takes the seeds from metrics.csv; drop --seeds")
    for path, ex in zip(args.experiments, experiments):
        out = args.output_dir or str(Path(args.results) / ex.name)
        if args.report_only:
            res = report_from_results(path, out, steps=args.steps)
            print(f"{ex.name}: report rebuilt from {out}/metrics.csv ({len(ex.variants)} variants × "
                  f"{res.experiment.seeds} seeds) -> {out}/")
        else:
            res = run_experiment(ex, out, progress=not args.no_progress, steps=args.steps, seeds=args.seeds)
            print(f"{ex.name}: {len(ex.variants)} variants × {res.experiment.seeds} seeds in {res.seconds:.1f} s "
                  f"-> {out}/")
        for s in res.summary:
            parts = [f"{m} {s[f'{m}_final']:.3g}" for m in ex.metrics]
            print(f"  {s['variant']:28s} " + "  ".join(parts))
        for c in res.claims:
            print("  " + claim_line(c))
    return 0


def cmd_train(args) -> int:
    from . import load
    try:
        from .lm.train import run_from_args
    except ImportError as e:
        raise UdrraError(f"udrra train needs the LM extras: pip install 'udrra[lm]' ({e})") from None
    return run_from_args(args, load(args.algorithm, _overrides(args.overrides)))


def cmd_train_rm(args) -> int:
    try:
        from .lm.train_rm import run_train_rm_from_args
    except ImportError as e:
        raise UdrraError(f"udrra train-rm needs the LM extras: pip install 'udrra[lm]' ({e})") from None
    return run_train_rm_from_args(args)


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
    p.add_argument("--prompts", type=int, default=None,
                   help=f"prompts P (default {DEFAULT_P} on the bandit, {DEFAULT_SEQ_P} on the sequence testbed)")
    p.add_argument("--responses", type=int, default=DEFAULT_K,
                   help=f"bandit responses per prompt K (default {DEFAULT_K})")
    p.add_argument("--testbed", choices=("bandit", "sequence"), default="bandit",
                   help="'bandit': one-token contextual bandit (default); 'sequence': autoregressive table policies "
                        "over whole responses of up to --max-len tokens (udrra.SequenceBandit); compositions without "
                        "a derived sequence target are listed as 'none' (a skip, not a failure)")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB,
                   help=f"sequence testbed: vocabulary size V, EOS = V − 1 (default {DEFAULT_VOCAB})")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                   help=f"sequence testbed: maximum response length L (default {DEFAULT_MAX_LEN})")
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
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild summary.csv, the claims and report.md from the output folder's "
                        "metrics.csv (figures are left as they are)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("train", help="train a language model with any composition (offline pairs or online RL)",
                       description="Train a causal LM through the same loss code: offline-pair compositions (dpo, "
                                   "ipo, cdpo, rdpo, hinge, simpo) on --dataset; on_policy / on_policy_pairs "
                                   "compositions (ppo, grpo, rloo, remax, reinforce, online_dpo, dpo_iter, or your "
                                   "own TOML) on --prompts with a --reward.")
    p.add_argument("algorithm", metavar="NAME|PATH")
    _add_set(p)
    try:
        from .lm.train import add_train_arguments
        add_train_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-rm", help="train a Bradley-Terry reward model on preference pairs",
                       description="Train a one-output sequence-classification reward model (Bradley-Terry loss) "
                                   "on preference data; the saved directory is a --reward for udrra train.")
    try:
        from .lm.train_rm import add_train_rm_arguments
        add_train_rm_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=cmd_train_rm)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RunInterrupted as e:
        if os.environ.get("RANK", "0") == "0":           # one line, from the main process of a launched run
            print(f"udrra: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except TrainingError as e:
        print(f"udrra: error: {e}", file=sys.stderr)
        return 3
    except UdrraError as e:
        print(f"udrra: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("udrra: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
