"""Fused linear log-prob Triton kernels: per-token ``log softmax((X·Wᵀ + b)/T)[y]`` without the N×V logits.

Notation: ``N`` rows (tokens), ``H`` hidden size, ``V`` vocabulary size. Inputs are the hidden states
``X (N, H)``, the output-embedding weight ``W (V, H)``, an optional bias ``b (V,)``, integer targets
``y (N,)`` and a temperature ``T > 0``. The logits are ``z = (X·Wᵀ + b) / T``; they are never stored as a
whole: every kernel walks the vocabulary in tiles of ``BLOCK_V`` columns and the hidden size in tiles of
``BLOCK_H``, computing one ``BLOCK_N × BLOCK_V`` logit tile at a time with ``tl.dot`` (fp32 accumulator,
whatever the input dtype).

Per row ``t`` (all in nats, computed in fp32):

* ``lse_t = log Σ_v exp z_tv`` (online log-sum-exp over vocabulary tiles: running max ``m``, running
  ``s = Σ exp(z − m)``, both rescaled when ``m`` grows);
* ``logp_t = z_{t,y_t} − lse_t``;
* ``entropy_t = lse_t − Σ_v p_tv z_tv`` with ``p = softmax(z)``. It is accumulated as
  ``a = Σ_v exp(z − m)·(z − m)`` (rescaled with the max like ``s``), so ``entropy = log s − a/s`` with no
  cancellation between two large numbers when ``|z|`` is large. Masked logits (``z = −inf``, e.g. a ``−inf``
  bias entry) have ``p = 0`` and contribute 0 to the entropy and to its gradient (``0·log 0 = 0``).

Rows whose target equals ``ignore_index`` get ``logp = 0``, ``entropy = 0`` and zero gradient.

Backward, with upstream per-row gradients ``g_t`` (of ``logp``) and ``e_t`` (of ``entropy``, optional)::

    dL/dz_tv = g_t·(1[v = y_t] − p_tv) − e_t·p_tv·(z_tv − lse_t + entropy_t)
    dZ_raw   = (dL/dz) / T
    dX = dZ_raw·W  (N, H),   dW = dZ_rawᵀ·X  (V, H),   db = Σ_t dZ_raw[t]  (V,)

Design (no atomics, so results are deterministic run to run):

* forward: ``_fwd_kernel``, grid ``(row blocks, vocabulary splits)``. Each program walks its rows through
  a contiguous range of vocabulary tiles and writes per-row partial ``(m, s, a, z_y)``; a few fp32 torch ops
  merge the splits (one split on CPU; on GPU enough splits to fill the SMs when ``N`` is small).
* backward: the rows are processed in chunks of ``chunk_rows`` (so the only large buffer is one
  ``chunk_rows × V`` workspace, never ``N × V``). Per chunk, ``_bwd_dz_kernel`` (one program per vocabulary
  tile, looping over the chunk's row blocks) recomputes the logit tiles from X, W, b, the saved ``lse``
  and ``entropy``, forms the ``dZ_raw`` tile, writes it to the workspace in the input dtype and adds its
  column sums (fp32) to ``db``. Two launches of the tiled ``_gemm_kernel`` then give
  ``dX[chunk] = dZ·W`` (fp32 accumulator, stored in the input dtype) and ``dW += dZᵀ·X[chunk]`` (fp32
  buffer, cast to the input dtype at the end).

fp32 inputs use ``tl.dot(..., input_precision="ieee")`` (no TF32), so fp32 results are fp32-exact on GPU as
well as under the interpreter; bf16/fp16 inputs use the tensor cores with fp32 accumulators.

Running on CPU tensors needs the Triton interpreter: set ``TRITON_INTERPRET=1`` in the environment *before*
this module is imported (Triton reads it when the kernels are decorated).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import InputError

try:  # triton is optional: the module imports without it, and triton_available() says False.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = [
    "triton_available",
    "forward",
    "backward",
    "DEFAULT_BLOCK_N",
    "DEFAULT_BLOCK_V",
    "DEFAULT_BLOCK_H",
    "DEFAULT_WORKSPACE_BYTES",
]

#: Default rows per tile (``tl.dot`` M dimension).
DEFAULT_BLOCK_N = 64
#: Default vocabulary columns per tile.
DEFAULT_BLOCK_V = 128
#: Default hidden-size slice per ``tl.dot`` step (the reduction dimension of the logit tile).
DEFAULT_BLOCK_H = 64
#: Default size of the backward ``chunk_rows × V`` dZ workspace (256 MiB: 1024 rows at V = 131072 in bf16).
DEFAULT_WORKSPACE_BYTES = 256 * 2**20

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Finite stand-in for -inf (out-of-range vocabulary columns, empty running max): exp(NEG - x) == 0 and
# 0 * NEG == 0, so no inf - inf or 0 * inf NaN can appear. Logits that are -inf themselves (a masked vocabulary:
# -inf bias entries) have p = 0; the log-terms that multiply p in the entropy and its gradient are clamped to
# NEG (tl.maximum) so that they contribute 0 (0·log 0 = 0) instead of 0·(-inf) = NaN. The clamp is exact:
# any log-term below NEG already has p = exp(...) == 0.
_NEG = -1.0e30


def triton_available() -> bool:
    """True when the ``triton`` package is importable (the kernels can be defined).

    It does not check for a GPU: on CPU tensors the kernels run only under ``TRITON_INTERPRET=1``.
    """
    return triton is not None


if triton is not None:

    # jit functions may only read constexpr globals
    _NEG_C = tl.constexpr(_NEG)

    @triton.jit
    def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
        """``acc + a·b`` with an fp32 accumulator.

        Under the interpreter (INTERPRETER=True) the operands are converted to fp32 first: the interpreter's
        ``tl.dot`` multiplies the raw uint16 storage of bf16 operands. A product of two bf16/fp16 values is
        exact in fp32, so this matches the tensor-core result up to summation order.
        """
        if INTERPRETER:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _cast_out(x, OUT_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
        """fp32 -> OUT_DTYPE with round-to-nearest-even. On GPU a plain ``.to``; the interpreter truncates
        fp32 -> bf16, so there the value is first rounded to the nearest bf16 in fp32 bits (exact afterwards)."""
        if INTERPRETER:
            if OUT_DTYPE == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
        return x.to(OUT_DTYPE)

    @triton.jit
    def _logit_tile(X, W, B, offs_n, n_mask, offs_v, v_mask, H,
                    stride_xn, stride_xh, stride_wv, stride_wh, inv_t,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
        """fp32 tile ``(X[offs_n]·W[offs_v]ᵀ + b[offs_v]) · inv_t`` of shape (BLOCK_N, BLOCK_V).

        Out-of-range rows read X as 0 and out-of-range columns read W as 0 (the caller masks them).
        """
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        x_rows = X + offs_n.to(tl.int64)[:, None] * stride_xn
        w_cols = W + offs_v.to(tl.int64)[None, :] * stride_wv
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < H
            x = tl.load(x_rows + offs_h[None, :] * stride_xh,
                        mask=n_mask[:, None] & h_mask[None, :], other=0.0)
            # W tile loaded already transposed: (BLOCK_H, BLOCK_V)
            wt = tl.load(w_cols + offs_h[:, None] * stride_wh,
                         mask=h_mask[:, None] & v_mask[None, :], other=0.0)
            acc = _mma(x, wt, acc, DOT_PRECISION, INTERPRETER)
        if HAS_BIAS:
            b = tl.load(B + offs_v, mask=v_mask, other=0.0).to(tl.float32)
            acc = acc + b[None, :]
        return acc * inv_t

    @triton.jit
    def _fwd_kernel(X, W, B, Y, M_OUT, S_OUT, A_OUT, ZY_OUT,
                    N, V, H, stride_xn, stride_xh, stride_wv, stride_wh,
                    inv_t, ignore_index, tiles_per_split,
                    HAS_BIAS: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
        """Partial online log-sum-exp of rows ``pid_n`` over vocabulary split ``pid_s``.

        Writes, at ``[pid_s, row]``: running max ``m``, ``s = Σ exp(z − m)``, ``a = Σ exp(z − m)(z − m)``
        (when COMPUTE_ENTROPY) and the target logit ``z_y`` if the target falls in this split (else 0).
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        y = tl.load(Y + offs_n, mask=n_mask, other=ignore_index)

        m = tl.full([BLOCK_N], _NEG_C, dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        a = tl.zeros([BLOCK_N], dtype=tl.float32)
        zy = tl.zeros([BLOCK_N], dtype=tl.float32)

        v_start = pid_s * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            z = _logit_tile(X, W, B, offs_n, n_mask, offs_v, v_mask, H,
                            stride_xn, stride_xh, stride_wv, stride_wh, inv_t,
                            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, INTERPRETER)
            z = tl.where(v_mask[None, :], z, _NEG_C)
            zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            d = m - m_new  # <= 0
            alpha = tl.exp(d)
            zc = z - m_new[:, None]
            ez = tl.exp(zc)
            if COMPUTE_ENTROPY:
                # Σ e^{z-m_new}(z-m_new) over the old terms = alpha·(a + d·s); a -inf logit (masked vocabulary)
                # has ez = 0 and zc = -inf: clamped to _NEG so that it adds 0 (0·log 0 = 0), not NaN
                a = alpha * (a + d * s) + tl.sum(ez * tl.maximum(zc, _NEG_C), axis=1)
            s = s * alpha + tl.sum(ez, axis=1)
            m = m_new

        out = pid_s * N + offs_n
        tl.store(M_OUT + out, m, mask=n_mask)
        tl.store(S_OUT + out, s, mask=n_mask)
        tl.store(ZY_OUT + out, zy, mask=n_mask)
        if COMPUTE_ENTROPY:
            tl.store(A_OUT + out, a, mask=n_mask)

    @triton.jit
    def _bwd_dz_kernel(X, W, B, Y, LSE, ENT, G, E, DZ, DB,
                       row0, n_rows, V, H,
                       stride_xn, stride_xh, stride_wv, stride_wh, stride_dzn, stride_dzv,
                       inv_t, ignore_index,
                       HAS_BIAS: tl.constexpr, HAS_G: tl.constexpr, HAS_E: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
        """dZ_raw for rows ``[row0, row0 + n_rows)`` and vocabulary tile ``pid_v``.

        Stores the tile into the workspace ``DZ`` (local row index, input dtype) and, when HAS_BIAS, adds its
        fp32 column sums to ``DB[offs_v]`` (this program owns those columns: no atomics).
        """
        pid_v = tl.program_id(0)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        db_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for n0 in range(0, n_rows, BLOCK_N):
            local = n0 + tl.arange(0, BLOCK_N)
            n_mask = local < n_rows
            offs_n = row0 + local
            y = tl.load(Y + offs_n, mask=n_mask, other=ignore_index)
            valid = n_mask & (y != ignore_index)
            lse = tl.load(LSE + offs_n, mask=valid, other=0.0)
            z = _logit_tile(X, W, B, offs_n, n_mask, offs_v, v_mask, H,
                            stride_xn, stride_xh, stride_wv, stride_wh, inv_t,
                            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, INTERPRETER)
            keep = valid[:, None] & v_mask[None, :]
            zc = tl.where(keep, z - lse[:, None], _NEG_C)  # log p; _NEG where masked -> p = 0
            p = tl.exp(zc)
            dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            if HAS_G:
                g = tl.load(G + offs_n, mask=valid, other=0.0)
                onehot = (offs_v[None, :] == y[:, None]).to(tl.float32)
                dz += g[:, None] * (onehot - p)
            if HAS_E:
                e = tl.load(E + offs_n, mask=valid, other=0.0)
                ent = tl.load(ENT + offs_n, mask=valid, other=0.0)
                # a -inf logit (masked vocabulary) has p = 0 and zc = -inf: clamped to _NEG so that p·(log p + H)
                # is 0, not NaN (which would also poison the logp gradient: e = 0 still gives 0·(-inf))
                dz -= e[:, None] * p * (tl.maximum(zc, _NEG_C) + ent[:, None])
            dz = tl.where(keep, dz * inv_t, 0.0)
            tl.store(DZ + local.to(tl.int64)[:, None] * stride_dzn + offs_v[None, :] * stride_dzv,
                     _cast_out(dz, DZ.dtype.element_ty, INTERPRETER), mask=n_mask[:, None] & v_mask[None, :])
            if HAS_BIAS:
                db_acc += tl.sum(dz, axis=0)
        if HAS_BIAS:
            db_old = tl.load(DB + offs_v, mask=v_mask, other=0.0)
            tl.store(DB + offs_v, db_old + db_acc, mask=v_mask)

    @triton.jit
    def _gemm_kernel(A, Bm, C, M, Ncol, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     ACCUMULATE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_NC: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
        """``C[tile] (+)= A·B`` for A (M, K), B (K, Ncol), fp32 accumulator, stored in C's dtype."""
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = pid_c * BLOCK_NC + tl.arange(0, BLOCK_NC)
        m_mask = offs_m < M
        c_mask = offs_c < Ncol
        a_rows = A + offs_m.to(tl.int64)[:, None] * stride_am
        b_cols = Bm + offs_c.to(tl.int64)[None, :] * stride_bn
        acc = tl.zeros([BLOCK_M, BLOCK_NC], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(a_rows + offs_k.to(tl.int64)[None, :] * stride_ak,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_cols + offs_k.to(tl.int64)[:, None] * stride_bk,
                        mask=k_mask[:, None] & c_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION, INTERPRETER)
        c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_c[None, :] * stride_cn
        mask = m_mask[:, None] & c_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, _cast_out(acc, C.dtype.element_ty, INTERPRETER), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# host-side helpers


def _require_triton(name: str) -> None:
    if triton is None:
        raise RuntimeError(f"{name}: the triton package is not installed (pip install triton)")


def _check_blocks(name: str, block_n: int, block_v: int, block_h: int) -> None:
    for label, b in (("block_n", block_n), ("block_v", block_v), ("block_h", block_h)):
        if not isinstance(b, int) or b < 16 or (b & (b - 1)) != 0:
            raise InputError(f"{name}: {label} must be a power of two >= 16 (tl.dot tiles), got {b!r}")


def _check_temperature(name: str, temperature: float) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise InputError(f"{name}: temperature must be a positive finite number, got {temperature!r}") from None
    if not math.isfinite(t) or t <= 0.0:
        raise InputError(f"{name}: temperature must be a positive finite number, got {temperature!r}")
    return t


def _check_device(name: str, t: Tensor) -> None:
    if t.device.type == "cpu" and not _interpreted():
        raise InputError(f"{name}: CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 before "
                         f"importing udrra.kernels.triton_logprobs, or move the tensors to a GPU")


def _interpreted() -> bool:
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_fwd_kernel, InterpretedFunction)


def _check_inputs(name: str, hidden: Tensor, weight: Tensor, targets: Tensor,
                  bias: Optional[Tensor], ignore_index: int) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        raise InputError(f"{name}: hidden must be a 2-D (N, H) tensor, got "
                         f"{tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise InputError(f"{name}: weight must be a 2-D (V, H={hidden.shape[1]}) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if hidden.shape[1] == 0 or weight.shape[0] == 0:
        raise InputError(f"{name}: H and V must be positive, got H={hidden.shape[1]}, V={weight.shape[0]}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise InputError(f"{name}: hidden dtype must be one of float32/bfloat16/float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise InputError(f"{name}: weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if not isinstance(targets, Tensor) or targets.shape != (hidden.shape[0],):
        raise InputError(f"{name}: targets must be a 1-D (N={hidden.shape[0]},) tensor, got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{name}: targets dtype must be int64 (or int32), got {targets.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise InputError(f"{name}: bias must be a 1-D (V={weight.shape[0]},) tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != weight.dtype:
            raise InputError(f"{name}: bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
    for label, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise InputError(f"{name}: {label} is on {t.device} but hidden is on {hidden.device}")
    _check_device(name, hidden)
    if targets.numel():
        kept = targets[targets != ignore_index]
        if kept.numel():
            lo, hi = int(kept.min()), int(kept.max())
            if lo < 0 or hi >= weight.shape[0]:
                raise InputError(f"{name}: target ids must lie in [0, {weight.shape[0]}) or equal ignore_index "
                                 f"({ignore_index}); got min {lo}, max {hi}")


def _check_call(name: str, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                ignore_index: int, temperature: float, block_n: int, block_v: int, block_h: int) -> float:
    """The checks shared by :func:`forward` and :func:`backward`; returns the validated temperature."""
    _require_triton(name)
    t = _check_temperature(name, temperature)
    _check_blocks(name, block_n, block_v, block_h)
    _check_inputs(name, hidden, weight, targets, bias, ignore_index)
    return t


def _check_row_vector(name: str, label: str, t: Optional[Tensor], n: int,
                      device: torch.device) -> Optional[Tensor]:
    """Validate a per-row (N,) floating tensor and return it as a contiguous fp32 tensor."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.shape != (n,):
        raise InputError(f"{name}: {label} must be a 1-D (N={n},) tensor, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not t.is_floating_point():
        raise InputError(f"{name}: {label} must be a floating tensor, got {t.dtype}")
    if t.device != device:
        raise InputError(f"{name}: {label} is on {t.device} but hidden is on {device}")
    return t.detach().to(torch.float32).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32: exact fp32 products (no TF32 on tensor cores); bf16/fp16: the setting has no effect.
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_splits(n_rows: int, n_vtiles: int, block_n: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n_rows, block_n)
    return max(1, min(n_vtiles, triton.cdiv(2 * sms, row_blocks)))


# ----------------------------------------------------------------------------------------------------------
# public API


@torch.no_grad()
def forward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None, *,
            temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
            block_n: int = DEFAULT_BLOCK_N, block_v: int = DEFAULT_BLOCK_V, block_h: int = DEFAULT_BLOCK_H,
            num_splits: Optional[int] = None, num_warps: int = 4
            ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-row log-prob, log-sum-exp and (optionally) entropy of ``z = (X·Wᵀ + b)/T``, without the N×V logits.

    Args:
        hidden: ``X`` of shape ``(N, H)``, float32, bfloat16 or float16.
        weight: ``W`` of shape ``(V, H)``, same dtype as ``hidden``.
        targets: ``y`` of shape ``(N,)``, int64 (int32 accepted); each id in ``[0, V)`` or ``ignore_index``.
        bias: optional ``b`` of shape ``(V,)``, same dtype as ``weight``.
        temperature: ``T > 0``; logits are divided by it.
        ignore_index: target id marking rows to ignore (``logp = 0``, ``entropy = 0``).
        return_entropy: also compute ``entropy_t = lse_t − Σ_v p_tv z_tv``.
        block_n, block_v, block_h: tile sizes (rows, vocabulary columns, hidden slice); powers of two ≥ 16.
        num_splits: number of contiguous vocabulary ranges processed by separate programs and merged
            afterwards (``None``: 1 on CPU; on GPU enough to give about two programs per SM).
        num_warps: Triton ``num_warps`` for the launch (ignored by the interpreter).

    Returns:
        ``(logp, lse, entropy)``: float32 ``(N,)`` tensors in nats. ``logp_t = z_{t,y_t} − lse_t`` (≤ 0) and 0
        on ignored rows; ``lse_t = log Σ_v exp z_tv`` for every row (ignored rows included, it is what
        ``backward`` needs); ``entropy`` (≥ 0, 0 on ignored rows) or ``None`` when ``return_entropy`` is false.
        All maths (dot accumulation, online log-sum-exp) is in fp32 whatever the input dtype.

    Raises:
        InputError (a ``ValueError``): bad shapes or dtypes, mismatched devices, target ids outside
            ``[0, V)`` that are not ``ignore_index``, ``temperature`` not a positive finite number, tile
            sizes that are not powers of two ≥ 16, or CPU tensors without ``TRITON_INTERPRET=1``.
        RuntimeError: triton is not installed.
    """
    name = "triton_logprobs.forward"
    t = _check_call(name, hidden, weight, targets, bias, ignore_index, temperature, block_n, block_v, block_h)
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=dev)
        return empty, empty.clone(), (empty.clone() if return_entropy else None)

    y = targets.contiguous()
    b = bias.contiguous() if bias is not None else hidden  # dummy pointer when there is no bias
    n_vtiles = triton.cdiv(v, block_v)
    splits = _num_splits(n, n_vtiles, block_n, dev) if num_splits is None else int(num_splits)
    if splits < 1:
        raise InputError(f"{name}: num_splits must be >= 1, got {num_splits!r}")
    tiles_per_split = triton.cdiv(n_vtiles, min(splits, n_vtiles))
    splits = triton.cdiv(n_vtiles, tiles_per_split)  # no empty split

    m_part = torch.empty((splits, n), dtype=torch.float32, device=dev)
    s_part = torch.empty_like(m_part)
    zy_part = torch.empty_like(m_part)
    a_part = torch.empty_like(m_part) if return_entropy else m_part  # dummy when unused

    grid = (triton.cdiv(n, block_n), splits)
    _fwd_kernel[grid](
        hidden, weight, b, y, m_part, s_part, a_part, zy_part,
        n, v, h, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / t, ignore_index, tiles_per_split,
        HAS_BIAS=bias is not None, COMPUTE_ENTROPY=bool(return_entropy),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        DOT_PRECISION=_dot_precision(hidden.dtype), INTERPRETER=_interpreted(), num_warps=num_warps,
    )

    # merge the vocabulary splits (a no-op rescale when splits == 1)
    m = m_part.max(dim=0).values
    d = m_part - m  # <= 0
    scale = torch.exp(d)
    s = (s_part * scale).sum(dim=0)
    zy = zy_part.sum(dim=0)
    lse = m + torch.log(s)
    valid = y != ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    logp = torch.where(valid, zy - lse, zero)
    entropy = None
    if return_entropy:
        a = (scale * (a_part + d * s_part)).sum(dim=0)
        entropy = torch.where(valid, torch.log(s) - a / s, zero)
    return logp, lse, entropy


@torch.no_grad()
def backward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
             lse: Tensor, entropy: Optional[Tensor], grad_logp: Optional[Tensor],
             grad_entropy: Optional[Tensor], *, temperature: float, ignore_index: int,
             block_n: int = DEFAULT_BLOCK_N, block_v: int = DEFAULT_BLOCK_V, block_h: int = DEFAULT_BLOCK_H,
             chunk_rows: Optional[int] = None, num_warps: int = 4
             ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of ``Σ_t g_t·logp_t + e_t·entropy_t`` with respect to X, W and b, recomputing the logits.

    Args:
        hidden, weight, targets, bias, temperature, ignore_index: exactly as passed to :func:`forward`.
        lse: ``(N,)`` log-sum-exp returned by :func:`forward` (any float dtype; used in fp32).
        entropy: ``(N,)`` entropy returned by :func:`forward`; required when ``grad_entropy`` is given.
        grad_logp: ``(N,)`` upstream gradient ``g`` of ``logp``, or ``None`` for zero.
        grad_entropy: ``(N,)`` upstream gradient ``e`` of ``entropy``, or ``None`` for zero.
        block_n, block_v, block_h: tile sizes; powers of two ≥ 16.
        chunk_rows: rows per backward chunk; the only large temporary is a ``chunk_rows × V`` dZ workspace in
            the input dtype (``None``: as many rows as fit in ``DEFAULT_WORKSPACE_BYTES``, at least
            ``block_n``, at most ``N``).
        num_warps: Triton ``num_warps`` for the launches (ignored by the interpreter).

    With ``p = softmax(z)``, ``dL/dz_tv = g_t·(1[v = y_t] − p_tv) − e_t·p_tv·(z_tv − lse_t + entropy_t)``
    and ``dZ_raw = (dL/dz)/T``; rows with ``y_t == ignore_index`` contribute nothing.

    Returns:
        ``(d_hidden, d_weight, d_bias)``: ``dZ_raw·W`` of shape ``(N, H)`` in ``hidden``'s dtype,
        ``dZ_rawᵀ·X`` of shape ``(V, H)`` in ``weight``'s dtype (accumulated in fp32 across chunks) and
        ``Σ_t dZ_raw[t]`` of shape ``(V,)`` in ``bias``'s dtype (fp32 accumulation), or ``None`` without bias.

    Raises:
        InputError (a ``ValueError``): bad shapes, dtypes or devices (as :func:`forward`), ``lse`` /
            ``entropy`` / gradients not ``(N,)`` floating tensors, ``grad_entropy`` given without
            ``entropy``, ``temperature`` not positive and finite, bad tile sizes or ``chunk_rows < 1``.
        RuntimeError: triton is not installed.
    """
    name = "triton_logprobs.backward"
    t = _check_call(name, hidden, weight, targets, bias, ignore_index, temperature, block_n, block_v, block_h)
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    lse32 = _check_row_vector(name, "lse", lse, n, dev)
    if lse32 is None:
        raise InputError(f"{name}: lse is required (the value returned by forward)")
    g32 = _check_row_vector(name, "grad_logp", grad_logp, n, dev)
    e32 = _check_row_vector(name, "grad_entropy", grad_entropy, n, dev)
    ent32 = _check_row_vector(name, "entropy", entropy, n, dev)
    if e32 is not None and ent32 is None:
        raise InputError(f"{name}: grad_entropy was given but entropy is None; call forward with "
                         f"return_entropy=True")

    d_hidden = torch.zeros((n, h), dtype=hidden.dtype, device=dev)
    dw32 = torch.zeros((v, h), dtype=torch.float32, device=dev)
    db32 = torch.zeros((v,), dtype=torch.float32, device=dev) if bias is not None else None

    def _finish():
        d_weight = dw32 if weight.dtype == torch.float32 else dw32.to(weight.dtype)
        d_bias = None if db32 is None else (db32 if bias.dtype == torch.float32 else db32.to(bias.dtype))
        return d_hidden, d_weight, d_bias

    if n == 0 or (g32 is None and e32 is None):
        return _finish()

    if chunk_rows is None:
        per_row = v * hidden.element_size()
        chunk = max(block_n, (DEFAULT_WORKSPACE_BYTES // per_row) // block_n * block_n)
    else:
        chunk = int(chunk_rows)
        if chunk < 1:
            raise InputError(f"{name}: chunk_rows must be >= 1, got {chunk_rows!r}")
    chunk = min(chunk, n)

    y = targets.contiguous()
    b = bias.contiguous() if bias is not None else hidden
    dummy = lse32
    dz = torch.empty((chunk, v), dtype=hidden.dtype, device=dev)
    prec = _dot_precision(hidden.dtype)
    interp = _interpreted()
    n_vtiles = triton.cdiv(v, block_v)
    h_tiles = triton.cdiv(h, block_h)
    for row0 in range(0, n, chunk):
        rows = min(chunk, n - row0)
        _bwd_dz_kernel[(n_vtiles,)](
            hidden, weight, b, y, lse32,
            ent32 if ent32 is not None else dummy,
            g32 if g32 is not None else dummy,
            e32 if e32 is not None else dummy,
            dz, db32 if db32 is not None else dummy,
            row0, rows, v, h,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0), dz.stride(1),
            1.0 / t, ignore_index,
            HAS_BIAS=bias is not None, HAS_G=g32 is not None, HAS_E=e32 is not None,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, DOT_PRECISION=prec, INTERPRETER=interp,
            num_warps=num_warps,
        )
        # dX[rows] = dZ (rows, V) · W (V, H)
        dx = d_hidden[row0:row0 + rows]
        _gemm_kernel[(triton.cdiv(rows, block_n), h_tiles)](
            dz, weight, dx, rows, h, v,
            dz.stride(0), dz.stride(1), weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
            ACCUMULATE=False, BLOCK_M=block_n, BLOCK_NC=block_h, BLOCK_K=block_v,
            DOT_PRECISION=prec, INTERPRETER=interp, num_warps=num_warps,
        )
        # dW (V, H) += dZᵀ (V, rows) · X[rows] (rows, H), in fp32
        xc = hidden[row0:row0 + rows]
        _gemm_kernel[(n_vtiles, h_tiles)](
            dz, xc, dw32, v, h, rows,
            dz.stride(1), dz.stride(0), xc.stride(0), xc.stride(1), dw32.stride(0), dw32.stride(1),
            ACCUMULATE=row0 > 0, BLOCK_M=block_v, BLOCK_NC=block_h, BLOCK_K=block_n,
            DOT_PRECISION=prec, INTERPRETER=interp, num_warps=num_warps,
        )
    return _finish()
