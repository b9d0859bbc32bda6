"""What every side-by-side benchmark records about the code and packages it measured (shared by
``train_step_vs_trl.py`` and ``online_vs_trl.py``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def versions(packages: Sequence[str]) -> Dict[str, str]:
    """``{package: installed version or "not installed"}``."""
    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_state() -> dict:
    """The commit, the uncommitted files under ``udrra/`` and a short hash of their diff (the measured tree)."""
    def g(*a):
        return subprocess.run(["git", *a], cwd=str(ROOT), capture_output=True, text=True).stdout

    try:
        diff = g("diff", "HEAD", "--", "udrra")
        return {"commit": g("rev-parse", "--short", "HEAD").strip() or "?",
                "dirty_udrra": [ln[3:] for ln in g("status", "--porcelain", "--", "udrra").splitlines()],
                "udrra_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None}
    except OSError:
        return {"commit": "?", "dirty_udrra": [], "udrra_diff_sha256": None}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def run_child(cmd: Sequence[str], out: Path, label: Mapping[str, str], timeout: float,
              env: Optional[Mapping[str, str]] = None) -> dict:
    """Run one benchmark child process (from the repository root) that writes its result as JSON to ``out``;
    returns that result with ``wall_s``, or ``label`` + ``error``, ``log_tail`` and ``wall_s`` when the child
    failed. ``subprocess.TimeoutExpired`` propagates (callers decide whether a timeout is an error row)."""
    t0 = time.perf_counter()
    p = subprocess.run(list(cmd), cwd=str(ROOT), capture_output=True, text=True, timeout=timeout,
                       env=None if env is None else dict(env))
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not out.exists():
        tail = (p.stdout[-2000:] + "\n" + p.stderr[-4000:]).strip()
        return {**label, "error": f"child exited with status {p.returncode}", "log_tail": tail, "wall_s": wall}
    r = json.loads(out.read_text())
    r["wall_s"] = wall
    return r
