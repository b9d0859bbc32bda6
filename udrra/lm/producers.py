"""The LM trainer's sample sources for :func:`udrra.loop.fit` (see :class:`udrra.loop.Producer`), one per
``[source]`` kind (:data:`PRODUCERS`):

- :class:`OfflinePairs` (``offline_pairs``) serves a fixed, tokenised preference data set: ``collect`` takes the
  next ``batch_size`` pairs of a seeded shuffle and scores them under the reference without gradient; ``attach``
  scores the same pairs under the current policy with gradient.
- :class:`OnPolicy` (``on_policy``: PPO, REINFORCE, ReMax, RLOO, GRPO, ...) samples ``n`` responses to each of
  the step's prompts from the current policy, scores them with the run's reward, and returns a token-level
  :class:`~udrra.batch.SampleBatch` (old-policy, reference and entropy per token from one no-grad pass each,
  the critic's values for ``gae``, the greedy decode's reward for a ``greedy`` baseline).
- :class:`OnPolicyPairs` (``on_policy_pairs``: online DPO, iterated DPO) samples two responses per prompt and
  labels the pair by the reward (Bradley–Terry), returning a :class:`~udrra.batch.PairBatch`.

Also here: the pair-batch helpers that the trainer's evaluation shares (:func:`pair_batch`, :func:`batch_logps`,
:func:`to_device`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..batch import Normalisers, PairBatch, SampleBatch
from ..errors import ConfigError, InputError
from .data import TokenizedPair, collate_pairs
from .logprobs import DEFAULT_CHUNK_TOKENS, response_logps, sequence_logps
from .rollout import Rollout, Sampling, generate, seed_of, shape_rewards

__all__ = ["OfflinePairs", "OnPolicy", "OnPolicyPairs", "PromptStream", "RolloutContext", "PAIR_LABELS",
           "PRODUCERS", "pair_batch", "batch_logps", "to_device"]


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


class SeededOrder:
    """The data order of every LM producer: a ``random.Random(seed)`` shuffle of ``range(size)`` per epoch; each
    ``next()`` takes the next ``batch_size`` indices, and a new epoch (fresh shuffle) starts when fewer than
    ``batch_size`` are left. Under data parallelism ``batch_size`` is the global batch and each process keeps its
    shard (:meth:`udrra.lm.parallel.World.shard`). ``draws`` counts the batches taken."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size = size, batch_size
        self._rng = random.Random(seed)
        self._order: List[int] = []
        self._pos = 0
        self.epoch = -1
        self.draws = 0

    def next(self) -> List[int]:
        if self._pos + self.batch_size > len(self._order):
            self.epoch += 1
            self._order = list(range(self.size))
            self._rng.shuffle(self._order)
            self._pos = 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        self.draws += 1
        return idx

    def state_dict(self) -> Dict[str, Any]:
        """The position in the order (for checkpoints): the RNG state, the epoch's order, the position."""
        return {"rng": self._rng.getstate(), "order": list(self._order), "pos": self._pos, "epoch": self.epoch,
                "draws": self.draws}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self._rng.setstate(d["rng"])
        self._order, self._pos, self.epoch, self.draws = list(d["order"]), int(d["pos"]), int(d["epoch"]), int(d["draws"])


def _one_process() -> Any:
    from .parallel import World

    return World.single()


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

    Under data parallelism (``world`` of N processes) each batch is this process's shard of a global batch of
    ``N × batch_size`` pairs (:mod:`udrra.lm.parallel`); ``pairs_seen`` and ``tokens_seen`` count the global
    batches.

    Args:
        rows: the training pairs (``len(rows) >= N × batch_size``). batch_size: pairs per batch and process.
        pad_token_id: padding of the collated batches. device: where the batches go.
        policy, reference: causal LMs (``reference`` None: no reference); ``policy`` as prepared
            (:class:`udrra.lm.logprobs.LogProbModel`).
        seed: seed of the data order. chunk_tokens: passed to :func:`sequence_logps`.
        world: the run's :class:`udrra.lm.parallel.World` (default: one process).
    """

    def __init__(self, rows: List[TokenizedPair], *, batch_size: int, pad_token_id: int, device: Any, policy: Any,
                 reference: Optional[Any], seed: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, world: Any = None):
        self.world = world or _one_process()
        global_batch = batch_size * self.world.size
        if len(rows) < global_batch:
            raise InputError(f"the training split has {len(rows)} pairs, fewer than the global batch of "
                             f"{global_batch} (batch_size={batch_size} x {self.world.size} processes)")
        self.rows, self.batch_size, self.pad_token_id, self.device = rows, batch_size, pad_token_id, device
        self.policy, self.reference, self.chunk_tokens = policy, reference, chunk_tokens
        self._order = SeededOrder(len(rows), global_batch, seed)
        self.pairs_seen = 0
        self.tokens_seen = 0
        self.attached: List[Tuple[int, Tensor]] = []
        self._last: Optional[Tuple[PairBatch, Dict[str, Tensor]]] = None

    @property
    def epoch(self) -> int:
        return self._order.epoch

    def next_rows(self) -> List[TokenizedPair]:
        """This process's ``batch_size`` rows of the next global batch of the data order."""
        return [self.rows[i] for i in self.world.shard(self._order.next())]

    def state_dict(self) -> Dict[str, Any]:
        return {"order": self._order.state_dict(), "pairs_seen": self.pairs_seen, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self._order.load_state_dict(d["order"])
        self.pairs_seen, self.tokens_seen = int(d["pairs_seen"]), int(d["tokens_seen"])

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
        self.pairs_seen += B * self.world.size
        self.tokens_seen += int(self.world.all_reduce([float(b["attention_mask"].sum())], "sum")[0])
        return batch

    def attach(self, batch: PairBatch) -> PairBatch:
        if self._last is None or batch is not self._last[0]:
            raise InputError("OfflinePairs.attach takes the batch its last collect() returned")
        b = self._last[1]
        B = batch.chosen_logps.shape[0]
        lp, _ = batch_logps(self.policy, b, self.chunk_tokens)
        self.attached.append((B, lp.detach()))
        return replace(batch, chosen_logps=lp[:B], rejected_logps=lp[B:])


# ------------------------------------------------------------------------------------------- online sources

#: how an on-policy pair is labelled from the run's reward r (``--pair-labels``): the Bradley–Terry probability
#: σ(r₁ − r₂) as a soft label (the expectation of a sampled label: same target, less variance), a label drawn
#: from it, or the better response wins (ties ½; a judge's pick, as TRL's OnlineDPOTrainer and OAIF do — it is
#: not Bradley–Terry in r, so the composition's Boltzmann target no longer applies).
PAIR_LABELS = ("expected", "sampled", "better")


class PromptStream:
    """The step's prompts: this process's ``batch_size`` of each global batch of tokenised prompts, in
    :class:`SeededOrder` (one process: the whole batch).

    Each prompt drawn comes with its sampling key ``seed_of(seed, draw, position)`` — ``draw`` the number of the
    global batch, ``position`` the prompt's place in it — from which its responses' per-row seeds derive
    (:func:`udrra.lm.rollout.generate`): N processes with ``batch_size`` b sample exactly the responses one
    process with ``batch_size`` N·b samples.

    Args:
        texts: prompt texts. ids: their token ids (already cut to the prompt budget), same length.
        batch_size: prompts per step and process. seed: seed of the order and of the sampling keys.
        world: the run's :class:`udrra.lm.parallel.World` (default: one process).
    Raises:
        InputError: fewer prompts than the global batch, or ``texts`` and ``ids`` of different lengths.
    """

    def __init__(self, texts: Sequence[str], ids: Sequence[Sequence[int]], batch_size: int, seed: int,
                 world: Any = None):
        self.world = world or _one_process()
        global_batch = batch_size * self.world.size
        if len(texts) != len(ids):
            raise InputError(f"{len(texts)} prompt texts but {len(ids)} tokenised prompts")
        if len(texts) < global_batch:
            raise InputError(f"the training prompts number {len(texts)}, fewer than the global batch of "
                             f"{global_batch} prompts per step (batch_size={batch_size} x {self.world.size} processes)")
        self.texts, self.ids, self.seed = list(texts), [list(i) for i in ids], int(seed)
        self._order = SeededOrder(len(texts), global_batch, seed)
        self.prompts_seen = 0

    @property
    def epoch(self) -> int:
        return self._order.epoch

    def next(self) -> Tuple[List[str], List[List[int]], List[int]]:
        """``(texts, ids, keys)`` of this process's prompts of the next global batch."""
        draw = self._order.draws
        idx = self._order.next()
        self.prompts_seen += len(idx)
        start = self.world.rank * (len(idx) // self.world.size)
        mine = self.world.shard(idx)
        keys = [seed_of(self.seed, draw, start + i) for i in range(len(mine))]
        return [self.texts[i] for i in mine], [self.ids[i] for i in mine], keys

    def state_dict(self) -> Dict[str, Any]:
        return {"order": self._order.state_dict(), "prompts_seen": self.prompts_seen}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self._order.load_state_dict(d["order"])
        self.prompts_seen = int(d["prompts_seen"])


@dataclass
class RolloutContext:
    """What an online producer needs besides the algorithm.

    Attributes:
        policy: the model trained (as prepared by accelerate: its forward runs the gradient pass).
        sampler: the same model unwrapped (``generate`` and the no-grad passes).
        reference: π_ref (None when the algorithm uses none). critic: a :class:`udrra.lm.critic.ValueModel` for
            ``gae`` compositions, else None.
        tokenizer: decodes responses for the reward. reward: ``(prompts, responses) -> (B,) tensor``
            (:class:`udrra.lm.rewards.Reward`, validated there).
        sampling: :class:`udrra.lm.rollout.Sampling`. truncated_penalty, overlong_buffer: see
            :func:`udrra.lm.rollout.shape_rewards`. pair_labels: one of :data:`PAIR_LABELS`.
        chunk_tokens: passed to the log-prob op.
        fuse_old_logps: one policy pass per step: ``collect`` computes the policy's log-probs WITH gradient and
            ``attach`` returns them (π_old = π_θ detached, exact for one epoch over the whole batch; TRL skips
            the old-logp pass the same way). Only valid with one epoch and no micro-batches.
        world: the run's :class:`udrra.lm.parallel.World` (None: one process); the step statistics and samples
            are gathered over its processes.
    """

    policy: Any
    sampler: Any
    reference: Optional[Any]
    critic: Optional[Any]
    tokenizer: Any
    reward: Callable[[Sequence[str], Sequence[str]], Tensor]
    sampling: Sampling
    truncated_penalty: float = 0.0
    overlong_buffer: int = 0
    pair_labels: str = "expected"
    chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS
    fuse_old_logps: bool = False
    world: Any = None

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


class _Online:
    """Shared stages of the online producers: rollout → reward → no-grad log-probs; timing and step stats."""

    def __init__(self, algorithm: Any, prompts: PromptStream, ctx: RolloutContext, n: int):
        self.algorithm, self.prompts, self.ctx, self.n = algorithm, prompts, ctx, n
        self.rollout: Optional[Rollout] = None
        self.stats: Dict[str, float] = {}
        self.samples: List[Dict[str, Any]] = []
        self.tokens_generated = 0
        self._fused: Optional[Tensor] = None

    def _rollout(self, n: int, greedy: bool = False, prompts=None) -> Rollout:
        texts, ids, keys = prompts if prompts is not None else self.prompts.next()
        c = self.ctx
        return generate(c.sampler, ids, texts, c.sampling, n=n, greedy=greedy, pad_token_id=c.pad_token_id,
                        eos_token_id=c.eos_token_id, tokenizer=c.tokenizer, seeds=keys)

    @property
    def world(self) -> Any:
        return self.ctx.world or _one_process()

    def state_dict(self) -> Dict[str, Any]:
        return {"prompts": self.prompts.state_dict(), "tokens_generated": self.tokens_generated}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.prompts.load_state_dict(d["prompts"])
        self.tokens_generated = int(d["tokens_generated"])

    def _score(self, ro: Rollout) -> Tuple[Tensor, Tensor]:
        """``(raw, shaped)`` rewards ``(B,)`` on the rollout's device."""
        c = self.ctx
        raw = c.reward(ro.row_prompts(), ro.responses).to(ro.response_mask.device, torch.float32)
        return raw, shape_rewards(raw, ro, truncated_penalty=c.truncated_penalty, overlong_buffer=c.overlong_buffer,
                                  max_new_tokens=c.sampling.max_new_tokens)

    def _logps(self, model: Any, ro: Rollout, rows: Optional[Tensor] = None, entropy: bool = False):
        ids, att, mask = ro.input_ids, ro.attention_mask, ro.response_mask
        if rows is not None:
            ids, att, mask = ids[rows], att[rows], mask[rows]
        return response_logps(model, ids, att, ro.prompt_len, mask, temperature=self.ctx.sampling.temperature,
                              return_entropy=entropy, chunk_tokens=self.ctx.chunk_tokens)

    def _old_logps(self, ro: Rollout) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(old_logps, entropy, logps_with_grad)``: the rollout policy's token log-probs (detached) and entropy;
        with ``fuse_old_logps`` the same pass keeps its graph and is returned as the third item."""
        if not self.ctx.fuse_old_logps:
            old, ent = self._logps(self.ctx.sampler, ro, entropy=True)
            return old, ent, None
        with torch.enable_grad():
            lp, ent = self._logps(self.ctx.policy, ro, entropy=True)
        return lp.detach(), ent.detach(), lp

    def _record(self, ro: Rollout, raw: Tensor, shaped: Tensor, old: Tensor, ref: Tensor, ent: Tensor,
                times: Dict[str, float]) -> None:
        """The step's statistics over the rows of every process (gathered), and its samples (main process)."""
        m, w = ro.response_mask, self.world
        d = ((old - ref) * m).sum(-1).double()
        cols = [raw.double(), shaped.double(), d, (ent * m).sum(-1).double(), m.sum(-1).double(),
                ro.truncated.double()]
        raw, shaped, d, ent_sum, n, trunc = w.gather_rows(torch.stack(cols, -1)).unbind(-1)
        self.tokens_generated += int(n.sum())
        self.stats = {"reward": float(raw.mean()), "reward_shaped": float(shaped.mean()),
                      "reward_std": float(raw.std()) if raw.numel() > 1 else 0.0,
                      "kl_k1": float(d.mean()), "kl_k3": float((torch.exp(-d) - 1 + d).mean()),
                      "entropy": float(ent_sum.sum() / n.sum()), "response_length": float(n.mean()),
                      "truncated_rate": float(trunc.mean()), **times}
        rows = [{"prompt": p, "response": r, "reward": float(x), "truncated": bool(t)}
                for p, r, x, t in zip(ro.row_prompts(), ro.responses, cols[0].tolist(), ro.truncated.tolist())]
        self.samples = w.gather_objects(rows)


class OnPolicy(_Online):
    """``[source] kind = "on_policy"``: ``n`` (``[source] n``) samples per prompt from the current policy.

    ``collect()`` (no gradient): the next prompts → :func:`generate` (``n`` per prompt, groups consecutive) →
    reward (shaped by the run's truncation rule) → old-policy log-probs and entropy per token (one pass, at the
    sampling temperature), reference log-probs (one pass; the old ones when the algorithm has no reference),
    the critic's values for ``gae``, and for a ``greedy`` baseline a greedy decode of every prompt and its
    reward (ReMax). Returns a validated :class:`SampleBatch` with weights ``1/B``, ``index`` = row numbers and
    the normalisers of the whole batch (``max_len`` = ``max_new_tokens``: Dr. GRPO's constant).

    ``attach(batch)`` scores the batch's rows (all, or a micro-batch of them via ``batch.index``) under the
    current policy (and critic) with gradient.
    """

    def __init__(self, algorithm: Any, prompts: PromptStream, ctx: RolloutContext):
        src = algorithm.components.source
        super().__init__(algorithm, prompts, ctx, int(src.get("n") or 1))
        self.greedy = algorithm.components.reward.get("baseline") == "greedy"
        self.gae = algorithm.components.reward.get("baseline") == "gae"
        if self.gae and ctx.critic is None:
            raise ConfigError(f"{algorithm.name}: the 'gae' reward estimate needs a critic; the trainer builds one "
                              f"(ValueModel) for gae compositions")

    @torch.no_grad()
    def collect(self) -> SampleBatch:
        c, t = self.ctx, {}
        t0 = time.time()
        texts_ids = self.prompts.next()
        ro = self._rollout(self.n, prompts=texts_ids)
        greedy_ro = self._rollout(1, greedy=True, prompts=texts_ids) if self.greedy else None
        t["generation_s"] = time.time() - t0
        t0 = time.time()
        raw, rewards = self._score(ro)
        greedy_rewards = self._score(greedy_ro)[1][ro.group] if greedy_ro is not None else None
        t["reward_s"] = time.time() - t0
        t0 = time.time()
        old, ent, self._fused = self._old_logps(ro)
        ref = self._logps(c.reference, ro) if c.reference is not None else old.clone()
        values = c.critic(ro.input_ids, ro.attention_mask, ro.prompt_len) * ro.response_mask if self.gae else None
        t["logprob_s"] = time.time() - t0
        self.rollout = ro
        self._record(ro, raw, rewards, old, ref, ent, t)
        if greedy_rewards is not None:
            self.stats["greedy_reward"] = float(self.world.gather_rows(greedy_rewards).mean())
        B = old.shape[0]
        w = torch.full((B,), 1.0 / B, dtype=torch.float32, device=old.device)
        norm = Normalisers.of(ro.response_mask, w, max_len=c.sampling.max_new_tokens)
        return SampleBatch(logps=old, old_logps=old, ref_logps=ref, rewards=rewards, group=ro.group, weights=w,
                           response_mask=ro.response_mask, greedy_rewards=greedy_rewards, old_values=values,
                           norm=norm, index=torch.arange(B, device=old.device)).validate()

    def attach(self, batch: SampleBatch) -> SampleBatch:
        if self.rollout is None or batch.index is None:
            raise InputError("OnPolicy.attach takes a batch (or a micro-batch) of its last collect()")
        ro, rows = self.rollout, batch.index
        if self._fused is not None and rows.shape[0] == self._fused.shape[0]:
            logps, self._fused = self._fused, None          # the graph of collect's pass, used once
        else:
            logps = self._logps(self.ctx.policy, ro, rows)
        values = None
        if self.gae:
            values = self.ctx.critic(ro.input_ids[rows], ro.attention_mask[rows], ro.prompt_len) * ro.response_mask[rows]
        return batch.with_logps(logps, values)


class BestOfN(_Online):
    """``[source] kind = "best_of_n"`` (RAFT, Dong et al. 2304.06767 Alg. 1): ``n`` samples per prompt from the
    round's sampler π_ref (the reference model; ``update = "reset_every"`` copies the policy into it every
    ``every`` optimizer steps, which starts the next round), scored by the run's reward, the best of each group
    kept (the first of ties) for maximum likelihood.

    ``collect()`` (no gradient) returns a :class:`SampleBatch` of the kept rows (``index`` = their rows in the
    rollout, weights ``1/G``); ``attach`` scores those rows under the policy with gradient. Statistics cover all
    ``n`` samples (what the sampler produced) plus ``kept_reward``.
    """

    def __init__(self, algorithm: Any, prompts: PromptStream, ctx: RolloutContext):
        if ctx.reference is None:
            raise ConfigError(f"{algorithm.name}: a best_of_n source samples from the reference model (the round's "
                              "sampler); the run has none")
        super().__init__(algorithm, prompts, ctx, int(algorithm.components.source["n"]))

    @torch.no_grad()
    def collect(self) -> SampleBatch:
        c, t = self.ctx, {}
        t0 = time.time()
        texts, ids, keys = self.prompts.next()
        ro = generate(c.reference, ids, texts, c.sampling, n=self.n, pad_token_id=c.pad_token_id,
                      eos_token_id=c.eos_token_id, tokenizer=c.tokenizer, seeds=keys)
        t["generation_s"] = time.time() - t0
        t0 = time.time()
        raw, rewards = self._score(ro)
        t["reward_s"] = time.time() - t0
        t0 = time.time()
        old, ent = self._logps(c.sampler, ro, entropy=True)
        ref = self._logps(c.reference, ro)
        t["logprob_s"] = time.time() - t0
        self.rollout = ro
        self._record(ro, raw, rewards, old, ref, ent, t)
        kept = rewards.view(-1, self.n).argmax(-1) + torch.arange(0, rewards.shape[0], self.n, device=rewards.device)
        self.stats["kept_reward"] = float(self.world.gather_rows(raw[kept]).mean())
        G = kept.shape[0]
        w = torch.full((G,), 1.0 / G, dtype=torch.float32, device=old.device)
        mask = ro.response_mask[kept]
        norm = Normalisers.of(mask, w, max_len=c.sampling.max_new_tokens)
        return SampleBatch(logps=old[kept], old_logps=old[kept], ref_logps=ref[kept], rewards=rewards[kept],
                           group=torch.arange(G, device=old.device), weights=w, response_mask=mask, norm=norm,
                           index=kept).validate()

    def attach(self, batch: SampleBatch) -> SampleBatch:
        if self.rollout is None or batch.index is None:
            raise InputError("BestOfN.attach takes a batch (or a micro-batch) of its last collect()")
        return batch.with_logps(self._logps(self.ctx.policy, self.rollout, batch.index))


class OnPolicyPairs(_Online):
    """``[source] kind = "on_policy_pairs"``: two samples per prompt from the current policy, labelled by the
    run's reward (online DPO, Guo et al. 2402.04792 Alg. 1; iterated DPO with ``reset_every``).

    ``collect()`` (no gradient) returns a :class:`PairBatch`: ``first``/``second`` = the two responses, ``labels``
    = P(first ≻ second) from the rewards per ``pair_labels`` (:data:`PAIR_LABELS`; ``expected``: σ(r₁ − r₂), the
    Bradley–Terry probability the composition's target assumes), reference log-probs summed over response
    tokens, lengths, both rewards (for ``reward_difference`` losses), weights ``1/G``. ``attach`` adds the
    policy's log-probs with gradient (one forward over the 2G responses).
    """

    def __init__(self, algorithm: Any, prompts: PromptStream, ctx: RolloutContext):
        if ctx.pair_labels not in PAIR_LABELS:
            raise InputError(f"pair_labels must be one of {', '.join(PAIR_LABELS)}, got {ctx.pair_labels!r}")
        super().__init__(algorithm, prompts, ctx, 2)

    def _labels(self, r1: Tensor, r2: Tensor, keys: Sequence[int]) -> Tensor:
        p = torch.sigmoid(r1 - r2)
        if self.ctx.pair_labels == "sampled":       # one draw per pair from its own key (any process layout)
            u = [torch.rand((), generator=torch.Generator().manual_seed(seed_of(k, 2))) for k in keys]
            return (torch.stack(u).to(p.device) < p).float()
        if self.ctx.pair_labels == "better":
            return (r1 > r2).float() + 0.5 * (r1 == r2).float()
        return p

    @torch.no_grad()
    def collect(self) -> PairBatch:
        c, t = self.ctx, {}
        t0 = time.time()
        texts_ids_keys = self.prompts.next()
        ro = self._rollout(2, prompts=texts_ids_keys)
        t["generation_s"] = time.time() - t0
        t0 = time.time()
        raw, rewards = self._score(ro)
        t["reward_s"] = time.time() - t0
        t0 = time.time()
        old, ent, self._fused = self._old_logps(ro)
        ref = self._logps(c.reference, ro) if c.reference is not None else torch.zeros_like(old)
        t["logprob_s"] = time.time() - t0
        self.rollout = ro
        self._record(ro, raw, rewards, old, ref if c.reference is not None else old, ent, t)
        seq_old, seq_ref, n = old.sum(-1), ref.sum(-1), ro.lengths
        G = seq_old.shape[0] // 2
        w = torch.full((G,), 1.0 / G, dtype=torch.float32, device=old.device)
        labels = self._labels(rewards[0::2], rewards[1::2], texts_ids_keys[2])
        self.stats["label_mean_confidence"] = float(self.world.gather_rows((labels - 0.5).abs()).mean() + 0.5)
        return PairBatch(chosen_logps=seq_old[0::2], rejected_logps=seq_old[1::2], ref_chosen_logps=seq_ref[0::2],
                         ref_rejected_logps=seq_ref[1::2], weights=w, labels=labels, chosen_lengths=n[0::2],
                         rejected_lengths=n[1::2], chosen_rewards=rewards[0::2], rejected_rewards=rewards[1::2],
                         group=torch.arange(G, device=old.device)).validate()

    def attach(self, batch: PairBatch) -> PairBatch:
        if self.rollout is None:
            raise InputError("OnPolicyPairs.attach takes the batch of its last collect()")
        if self._fused is not None:
            lp, self._fused = self._fused.sum(-1), None
        else:
            lp = self._logps(self.ctx.policy, self.rollout).sum(-1)
        return replace(batch, chosen_logps=lp[0::2], rejected_logps=lp[1::2])


#: the LM producer of each ``[source]`` kind (``offline_samples`` has none on an LM yet)
PRODUCERS = {"offline_pairs": OfflinePairs, "on_policy": OnPolicy, "on_policy_pairs": OnPolicyPairs}
