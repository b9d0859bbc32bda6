"""Per-token log-prob implementations compared in the benchmarks (forward + backward, per-token upstream grad).

Each function maps (X (N, H), W (V, H), y (N,)) to fp32 log-probs (N,), differentiable in X and W.
"""
import torch

from udrra.kernels import linear_logprobs


def naive(X, W, y):
    """Materialise logits, log_softmax, gather (what a plain HF forward + log_softmax does)."""
    return torch.log_softmax((X @ W.t()).float(), -1).gather(1, y[:, None]).squeeze(1)


def selective(X, W, y):
    """TRL-style selective log-softmax: materialised logits, target logit minus a row-chunked logsumexp
    (no full log_softmax tensor)."""
    logits = (X @ W.t()).float()
    picked = logits.gather(1, y[:, None]).squeeze(1)
    lse = torch.cat([torch.logsumexp(c, -1) for c in logits.split(256)])
    return picked - lse


def torch_lce(X, W, y):
    """torch.nn.functional.linear_cross_entropy, chunked options, reduction='none'."""
    return -torch.nn.functional.linear_cross_entropy(X, W, y, reduction="none",
                                                     options=torch.nn.LinearCrossEntropyOptions())


def udrra(X, W, y):
    """udrra.kernels.linear_logprobs, backend auto (on CPU: udrra's chunked path)."""
    return linear_logprobs(X, W, y)


def udrra_entropy(X, W, y):
    """udrra with the entropy also returned and differentiated (PPO/GRPO entropy bonus)."""
    lp, ent = linear_logprobs(X, W, y, return_entropy=True)
    return lp + 0.01 * ent


METHODS = {"naive": naive, "trl_selective": selective, "torch_linear_cross_entropy": torch_lce,
           "udrra": udrra, "udrra_with_entropy": udrra_entropy}
SHAPES = {"smollm2_head": (4096, 576, 49152), "larger_head": (4096, 1024, 32000)}


def make_inputs(N, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(N, H, generator=g) * 0.5).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g)
    return X, W, y, upstream


def step(fn, X, W, y, upstream):
    X.grad = W.grad = None
    (fn(X, W, y) * upstream).sum().backward()
