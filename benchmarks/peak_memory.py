"""Peak extra memory of one forward+backward, measured honestly as peak RSS in a fresh process.

Run as ``python benchmarks/peak_memory.py METHOD SHAPE``: prints one JSON line with the resident-set size after
the inputs and their gradient buffers are built (baseline), the peak RSS during one forward+backward (Linux
``VmHWM``, reset to the current RSS just before the step by writing 5 to ``/proc/self/clear_refs``), and their
difference (the extra memory the method needed). A fresh process per measurement keeps allocator caches of
other methods out of it.
"""
import json
import resource
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from logprob_methods import METHODS, SHAPES, make_inputs, step  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(method: str, shape: str) -> None:
    torch.set_num_threads(torch.get_num_threads())
    X, W, y, up = make_inputs(*SHAPES[shape])
    # warm the op on a tiny problem so one-off library allocations do not count as the method's memory
    x2, w2, y2, u2 = make_inputs(8, SHAPES[shape][1], 64)
    step(METHODS[method], x2, w2, y2, u2)
    X.grad = torch.zeros_like(X)
    W.grad = torch.zeros_like(W)  # gradients exist for every method: not counted as extra
    base = rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    step(METHODS[method], X, W, y, up)
    peak = vm_hwm_mb()
    print(json.dumps({"method": method, "shape": shape, "baseline_mb": base, "peak_mb": peak,
                      "extra_mb": peak - base}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
