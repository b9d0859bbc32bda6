"""GPU benchmark of per-token log-probs (run unattended, one command, on a CUDA machine):

    python benchmarks/gpu_logprobs.py [--out benchmarks/results/logprobs_gpu.md]

Shape N=8192, H=4096, V=128256, bf16, forward + backward with a per-token upstream gradient. Methods: naive
(logits → log_softmax → gather), torch.compile of naive, Liger's fused linear cross entropy with
reduction="none" (`liger-kernel`), Cut Cross-Entropy with reduction="none" (`cut-cross-entropy`), and udrra
(Triton). For each: median time over 10 runs after 3 warm-ups (CUDA events), peak allocated memory over the
inputs (torch.cuda.max_memory_allocated), and the ratio to the matmul floor 8·N·H·V FLOP at the bf16 matmul rate
measured on the same GPU in the same run. A method whose package is missing is reported as unavailable.
Goal (issue 3): udrra ≤ 1.2× the floor and faster than Liger and CCE in the same run.
"""
import argparse
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from udrra.kernels import linear_logprobs  # noqa: E402

N, H, V = 8192, 4096, 128256


def naive(X, W, y):
    return torch.log_softmax((X @ W.t()).float(), -1).gather(1, y[:, None]).squeeze(1)


def liger(X, W, y):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return -LigerFusedLinearCrossEntropyLoss(reduction="none")(W, X, y)


def cce(X, W, y):
    from cut_cross_entropy import linear_cross_entropy
    return -linear_cross_entropy(X, W, y, reduction="none")


def udrra(X, W, y):
    return linear_logprobs(X, W, y)


def timed(fn, X, W, y, g, reps=10, warmup=3):
    def run():
        X.grad = W.grad = None
        (fn(X, W, y).float() * g).sum().backward()
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        a @ b
    e.record()
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (s.elapsed_time(e) / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "logprobs_gpu.md"))
    args = ap.parse_args()
    lines = ["# logprobs_gpu", "", f"- date: {datetime.date.today().isoformat()}"]
    if not torch.cuda.is_available():
        lines += ["- machine: no GPU was available; nothing was measured", ""]
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("no GPU: wrote", args.out)
        return
    rate = matmul_rate()
    floor_ms = 8 * N * H * V / rate * 1e3
    lines += [f"- machine: {torch.cuda.get_device_name(0)}, python {platform.python_version()}, torch {torch.__version__}",
              f"- shape: N={N}, H={H}, V={V}, bf16, forward + backward, per-token upstream gradient",
              f"- measured bf16 matmul rate: {rate / 1e12:.0f} TFLOP/s; floor 8·N·H·V = {floor_ms:.1f} ms", "",
              "| method | median ms | × floor | peak extra MiB |", "|---|---|---|---|"]
    g = torch.Generator(device="cuda").manual_seed(0)
    X = (torch.randn(N, H, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    W = (torch.randn(V, H, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    up = torch.randn(N, device="cuda", generator=g)
    methods = {"naive": naive, "torch.compile(naive)": torch.compile(naive), "liger": liger, "cce": cce,
               "udrra": udrra}
    for name, fn in methods.items():
        try:
            ms, mb = timed(fn, X, W, y, up)
            lines.append(f"| {name} | {ms:.1f} | {ms / floor_ms:.2f} | {mb:.0f} |")
        except Exception as exc:  # a missing package or an OOM is a result too
            lines.append(f"| {name} | unavailable: {type(exc).__name__}: {str(exc)[:80]} | | |")
        torch.cuda.empty_cache()
        print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
