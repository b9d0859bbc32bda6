"""The LM trainer's sample sources for :func:`udrra.loop.fit` (see :class:`udrra.loop.Producer`).

:class:`OfflinePairs` serves a fixed, tokenised preference data set: ``collect`` takes the next ``batch_size``
pairs of a seeded shuffle and scores them under the reference without gradient; ``attach`` scores the same
pairs under the current policy with gradient. Also here: the pair-batch helpers that the trainer's evaluation
shares with it (:func:`pair_batch`, :func:`batch_logps`, :func:`to_device`).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..batch import PairBatch
from ..errors import InputError
from .data import TokenizedPair, collate_pairs
from .logprobs import DEFAULT_CHUNK_TOKENS, sequence_logps

__all__ = ["OfflinePairs", "pair_batch", "batch_logps", "to_device"]


def to_device(batch: Dict[str, Tensor], device: Any) -> Dict[str, Tensor]:
    """Every tensor of a collated batch on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def batch_logps(model: Any, b: Dict[str, Tensor], chunk_tokens: int) -> Tuple[Tensor, Tensor]:
    """``(logps, n_tokens)`` of the ``2B`` sequences of a collated pair batch (:func:`sequence_logps`)."""
    return sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], chunk_tokens=chunk_tokens)


def pair_batch(chosen: Tensor, rejected: Tensor, ref_c: Tensor, ref_r: Tensor, len_c: Tensor,
               len_r: Tensor) -> PairBatch:
    """A validated :class:`PairBatch` of dataset pairs: weights ``1/B``, labels 1 (the rows are ordered)."""
    B = chosen.shape[0]
    ones = torch.ones(B, dtype=torch.float32, device=chosen.device)
    return PairBatch(chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=ref_c,
                     ref_rejected_logps=ref_r, weights=ones / B, labels=ones, chosen_lengths=len_c,
                     rejected_lengths=len_r).validate()


class OfflinePairs:
    """Tokenised preference pairs as a :class:`udrra.loop.Producer`.

    Data order: a ``random.Random(seed)`` shuffle of all rows per epoch; each batch takes the next
    ``batch_size`` rows, and a new epoch (fresh shuffle) starts when fewer than ``batch_size`` rows are left.

    ``collect()`` returns the next batch with the reference's log-probs (zeros when ``reference`` is None: the
    algorithm uses none) under ``torch.no_grad()``; its policy log-probs are placeholders (the reference's, as if
    π = π_ref) until ``attach(batch)`` returns the same pairs scored by ``policy`` with gradient. Only the batch
    collected last can be attached. After each ``attach`` the pairs' detached policy log-probs are appended to
    ``attached`` (as ``(B, logps)``, chosen rows first) for the caller's metrics; ``pairs_seen`` and
    ``tokens_seen`` count what was collected.

    Args:
        rows: the training pairs (``len(rows) >= batch_size``). batch_size: pairs per batch.
        pad_token_id: padding of the collated batches. device: where the batches go.
        policy, reference: causal LMs (``reference`` None: no reference).
        seed: seed of the data order. chunk_tokens: passed to :func:`sequence_logps`.
    """

    def __init__(self, rows: List[TokenizedPair], *, batch_size: int, pad_token_id: int, device: Any, policy: Any,
                 reference: Optional[Any], seed: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        if len(rows) < batch_size:
            raise InputError(f"the training split has {len(rows)} pairs, fewer than batch_size={batch_size}")
        self.rows, self.batch_size, self.pad_token_id, self.device = rows, batch_size, pad_token_id, device
        self.policy, self.reference, self.chunk_tokens = policy, reference, chunk_tokens
        self._rng = random.Random(seed)
        self._order: List[int] = []
        self._pos = 0
        self.epoch = -1
        self.pairs_seen = 0
        self.tokens_seen = 0
        self.attached: List[Tuple[int, Tensor]] = []
        self._last: Optional[Tuple[PairBatch, Dict[str, Tensor]]] = None

    def next_rows(self) -> List[TokenizedPair]:
        """The next ``batch_size`` rows of the data order."""
        if self._pos + self.batch_size > len(self._order):
            self.epoch += 1
            self._order = list(range(len(self.rows)))
            self._rng.shuffle(self._order)
            self._pos = 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return [self.rows[i] for i in idx]

    @torch.no_grad()
    def collect(self) -> PairBatch:
        rows = self.next_rows()
        B = len(rows)
        b = to_device(collate_pairs(rows, self.pad_token_id), self.device)
        if self.reference is not None:
            rp, _ = batch_logps(self.reference, b, self.chunk_tokens)
        else:
            rp = torch.zeros(2 * B, dtype=torch.float32, device=self.device)
        n = (b["loss_mask"][:, 1:].bool() & b["attention_mask"][:, 1:].bool()).sum(-1).float()  # as sequence_logps
        batch = pair_batch(rp[:B], rp[B:], rp[:B], rp[B:], n[:B], n[B:])
        self._last = (batch, b)
        self.pairs_seen += B
        self.tokens_seen += int(b["attention_mask"].sum())
        return batch

    def attach(self, batch: PairBatch) -> PairBatch:
        if self._last is None or batch is not self._last[0]:
            raise InputError("OfflinePairs.attach takes the batch its last collect() returned")
        b = self._last[1]
        B = batch.chosen_logps.shape[0]
        lp, _ = batch_logps(self.policy, b, self.chunk_tokens)
        self.attached.append((B, lp.detach()))
        return replace(batch, chosen_logps=lp[:B], rejected_logps=lp[B:])
