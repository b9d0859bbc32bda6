"""Rollouts: the on-policy sample source on a causal LM (transformers ``generate``, KV cache, left padding).

A :class:`Rollout` holds one step's sampled responses in the layout every later stage reads::

    input_ids = [ left-padded prompt (P columns) | right-padded response (T columns) ]

Row ``b`` answers prompt ``group[b]``; the ``n`` responses of one prompt are consecutive rows (RLOO / GRPO
groups). ``response_mask`` is 1 on response tokens up to and including the first EOS and 0 after it (SmolLM2's
pad token is its EOS token, so the mask, never the token id, says where a response ends). A response that used
all ``max_new_tokens`` without an EOS is ``truncated``.

Sampling follows :class:`Sampling` exactly: a fresh ``GenerationConfig`` with ``do_sample=False`` (so none of the
checkpoint's own sampling defaults apply: transformers adds no warpers of its own), temperature / top-p / top-k as
given, applied by transformers' own warpers. The training log-probs divide the logits by the same
temperature (:func:`udrra.lm.logprobs.response_logps`), so at step 0 they equal the log-probs of generation to
fp32 round-off whenever top-k and top-p are off; with top-k / top-p on, training scores the tempered full
distribution (as verl and TRL do), not the truncated one that sampled.

Every sampled row draws its noise from its own seed, so a response is a function of (its prompt, its seed, the
model) only -- not of the other prompts in the batch, the batch size, the left padding, or which data-parallel
process draws it (a per-request seed, as ``vllm.SamplingParams.seed``). Row ``j`` of prompt ``i`` owns a
``torch.Generator`` on the model's device seeded with :func:`seed_of` ``(seeds[i], j)``; at every generation step,
from the first response token on, it draws one vector of ``V`` float64 uniforms ``u`` (``V`` = the logits' last dim)
and the token is ``argmax(s + g)`` with Gumbel noise ``g = -log(-log u)`` and ``s`` the logits after transformers'
own warpers in transformers' own order (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``).
By the Gumbel-max trick (Gumbel 1954; Maddison, Tarlow & Minka 2014, "A* Sampling") that token is an exact draw from
``softmax(s)``, the distribution ``do_sample=True`` samples from. It runs as a ``LogitsProcessor`` under
transformers' greedy decoding (``do_sample=False``), whose argmax then picks the sample. Without ``seeds`` the
``G`` seeds are drawn from the global torch RNG, so seeding it (``torch.manual_seed`` in ``fork_rng``) still
reproduces a run.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["Sampling", "Rollout", "generate", "seed_of", "shape_rewards"]


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled (run options ``--temperature --top-p --top-k --max-new-tokens``).

    Attributes:
        temperature: T > 0; logits are divided by T before sampling and in the training log-probs.
        top_p: nucleus mass in (0, 1] (1 = off). top_k: 0 = off.
        max_new_tokens: response budget in tokens (≥ 1); a response that reaches it without EOS is truncated.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 24

    def validate(self) -> "Sampling":
        """Raise :class:`InputError` naming the bad option and the valid range."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1 (every response needs a token to be scored), "
                             f"got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and self.temperature < float("inf")):
            raise InputError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        return self


@dataclass
class Rollout:
    """One step's sampled responses (see the module docstring for the layout).

    Attributes:
        prompt_ids: ``(B, P)`` int64, left-padded prompts. prompt_mask: ``(B, P)`` int64, 1 on prompt tokens.
        response_ids: ``(B, T)`` int64, right-padded responses. response_mask: ``(B, T)`` float32 0/1, 1 up to
            and including the first EOS.
        truncated: ``(B,)`` bool, the response hit ``max_new_tokens`` without an EOS.
        group: ``(B,)`` int64, the prompt (0..G−1) each row answers; a group's rows are consecutive.
        prompts: the ``G`` prompt texts; responses: the ``B`` decoded response texts (special tokens skipped).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    truncated: Tensor
    group: Tensor
    prompts: List[str]
    responses: List[str]

    @property
    def input_ids(self) -> Tensor:
        """``(B, P + T)`` prompt and response ids."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """``(B, P + T)``: the prompt mask, then the response mask."""
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` float, response tokens per row."""
        return self.response_mask.sum(-1)

    def row_prompts(self) -> List[str]:
        """The prompt text of every row (``B`` entries)."""
        return [self.prompts[int(g)] for g in self.group]


def _left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), int(pad_token_id), dtype=torch.long)
    att = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} has no tokens; every prompt needs at least one token (a bos) to sample "
                             f"from")
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        att[i, L - len(p):] = 1
    return ids, att


def _response_mask(resp: Tensor, eos_token_id: int):
    """1 up to and including the first EOS; truncated rows have no EOS."""
    is_eos = resp == int(eos_token_id)
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.float().argmax(-1), torch.full_like(has_eos, resp.shape[1], dtype=torch.long))
    cols = torch.arange(resp.shape[1])[None, :]
    mask = (cols <= first[:, None]) & (cols < resp.shape[1])
    return mask.float(), ~has_eos


_KEY_LIMIT = 1 << 64


def seed_of(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, the same in every process, Python run and platform.

    The keys are hashed by NumPy's ``SeedSequence`` (O'Neill's seed mixing, the scheme ``numpy.random`` spawns
    independent streams with). Each key is written as two 32-bit words (low first) behind a word holding the number
    of keys, so distinct key tuples never share an input (``SeedSequence`` of a bare list does not guarantee this:
    ``[2**32]`` and ``[0, 1]`` give the same words, and an input shorter than its 4-word pool is zero-padded, so
    ``[5, 7]`` and ``[5, 7, 0]`` mix alike). Python's ``hash`` is
    never used (it is salted per process for strings and not a mixing function for ints).

    Args:
        keys: at least one integer (``bool`` excluded) in ``[0, 2**64)``, e.g. ``(prompt seed, row)``.
    Returns:
        a Python ``int`` in ``[0, 2**63)``, usable by ``torch.Generator.manual_seed``.
    Raises:
        InputError: no keys, a key that is not an integer, or a negative key or one ``>= 2**64`` (negative keys are
            rejected rather than mapped, so two different keys can never collide).
    """
    if not keys:
        raise InputError("seed_of needs at least one integer key")
    words = [len(keys) & 0xFFFFFFFF, len(keys) >> 32]
    for i, k in enumerate(keys):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise InputError(f"seed_of keys must be integers in [0, 2**64), key {i} is {k!r} ({type(k).__name__})")
        k = int(k)
        if not 0 <= k < _KEY_LIMIT:
            raise InputError(f"seed_of keys must be integers in [0, 2**64), key {i} is {k}")
        words += [k & 0xFFFFFFFF, k >> 32]
    state = np.random.SeedSequence(np.asarray(words, dtype=np.uint32)).generate_state(2, dtype=np.uint64)
    return int((int(state[0]) ^ (int(state[1]) << 1)) & ((1 << 63) - 1))


def _check_seeds(seeds: Any, G: int) -> List[int]:
    """``seeds`` as ``G`` Python ints in ``[0, 2**64)``, or :class:`InputError` saying what is valid."""
    if isinstance(seeds, Tensor):
        if seeds.dim() != 1 or seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
            raise InputError(f"seeds must be a 1-D sequence of {G} integers (one per prompt), got a tensor of shape "
                             f"{tuple(seeds.shape)} and dtype {seeds.dtype}")
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (Sequence, np.ndarray)):
        raise InputError(f"seeds must be a sequence of {G} integers (one per prompt), got {type(seeds).__name__}")
    if len(seeds) != G:
        raise InputError(f"seeds must hold one integer per prompt: expected {G} (the number of prompts), "
                         f"got {len(seeds)}")
    out = []
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= int(s) < _KEY_LIMIT:
            raise InputError(f"seeds must be integers in [0, 2**64), seeds[{i}] is {s!r} ({type(s).__name__})")
        out.append(int(s))
    return out


@functools.lru_cache(maxsize=None)
def _gumbel_noise_class():
    """The Gumbel-noise ``transformers.LogitsProcessor`` subclass (built on first use: transformers loads lazily)."""
    from transformers import LogitsProcessor

    class GumbelNoise(LogitsProcessor):
        """Adds per-row Gumbel noise to the processed scores, so greedy decoding's argmax draws an exact sample.

        Row ``b`` draws one vector of ``V`` float64 uniforms from ``generators[b]`` per call, i.e. per generation
        step (transformers calls the processors once per step, from the first new token on). ``u`` is clamped into
        ``[tiny, 1 - 2**-53]`` (``torch.rand`` already excludes 1; 0 would give ``+inf`` noise) and
        ``g = -log(-log u)`` is standard Gumbel. ``scores``: ``(B, V)`` float. Returns ``(B, V)`` float64
        ``scores + g`` (``-inf`` from top-k / top-p stays ``-inf``).
        """

        def __init__(self, generators: Sequence[torch.Generator]):
            self.generators = list(generators)

        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            B, V = scores.shape
            if B != len(self.generators):
                raise RuntimeError(f"the Gumbel sampler was built for {len(self.generators)} rows but got scores "
                                   f"of {B} rows")
            u = torch.stack([torch.rand(V, generator=g, dtype=torch.float64, device=scores.device)
                             for g in self.generators])
            u = u.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 2.0 ** -53)
            return scores.double() - torch.log(-torch.log(u))

    return GumbelNoise


def _sampling_processors(sampling: Sampling, generators: Sequence[torch.Generator]):
    """transformers' temperature / top-k / top-p warpers, in the order and with the ``min_tokens_to_keep=1`` that
    ``generate(do_sample=True, num_beams=1)`` builds them, then the Gumbel noise (one generator per row)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = []
    if float(sampling.temperature) != 1.0:
        procs.append(TemperatureLogitsWarper(float(sampling.temperature)))
    if int(sampling.top_k) > 0:
        procs.append(TopKLogitsWarper(top_k=int(sampling.top_k), min_tokens_to_keep=1))
    if float(sampling.top_p) < 1.0:
        procs.append(TopPLogitsWarper(top_p=float(sampling.top_p), min_tokens_to_keep=1))
    procs.append(_gumbel_noise_class()(generators))
    return LogitsProcessorList(procs)


@torch.no_grad()
def generate(policy: Any, prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str], sampling: Sampling, *,
             n: int = 1, greedy: bool = False, pad_token_id: int, eos_token_id: int, tokenizer: Any = None,
             seeds: Optional[Sequence[int]] = None) -> Rollout:
    """Sample ``n`` responses to each prompt with ``policy.generate`` (batched, left-padded, KV cache).

    Args:
        policy: a Hugging Face causal LM (put in eval mode for the call, restored after).
        prompt_ids: ``G`` token-id lists (already truncated to the prompt budget). prompts: their ``G`` texts.
        sampling: :class:`Sampling`. n: responses per prompt (rows ``g·n … g·n + n − 1`` answer prompt ``g``).
        greedy: decode greedily instead (ReMax's baseline response; ``n`` must be 1).
        pad_token_id, eos_token_id: the tokenizer's ids (they may be equal). tokenizer: decodes the responses
            (``responses`` are empty strings without one).
        seeds: ``G`` integers in ``[0, 2**64)`` (a list, NumPy array or 1-D integer tensor), one per prompt: row
            ``j`` of prompt ``i`` samples with a generator seeded :func:`seed_of` ``(seeds[i], j)`` (module
            docstring), so its response depends on its prompt, seed and the model only. ``None``: ``G`` seeds are
            drawn with ``torch.randint(0, 2**62, (G,))`` from the global torch RNG. A greedy decode checks them and
            otherwise ignores them.
    Returns:
        :class:`Rollout` with ``B = G·n`` rows. The global torch RNG is advanced by exactly that one ``randint``
        draw when sampling without ``seeds``, and left untouched otherwise (given ``seeds``, or greedy): sampling
        itself uses only the per-row generators.
    Raises:
        InputError: no prompts, an empty prompt, ``n`` < 1, greedy with ``n`` > 1, invalid ``sampling``, ``seeds``
            not ``G`` integers in ``[0, 2**64)``.
    """
    from transformers import GenerationConfig

    sampling.validate()
    if not prompt_ids:
        raise InputError("generate needs at least one prompt")
    if n < 1 or (greedy and n != 1):
        raise InputError(f"n must be >= 1 (and 1 for a greedy decode), got n={n}, greedy={greedy}")
    G = len(prompt_ids)
    if seeds is not None:
        seeds = _check_seeds(seeds, G)
    device = next(policy.parameters()).device
    ids, att = _left_pad(prompt_ids, pad_token_id)
    ids, att = ids.repeat_interleave(n, 0), att.repeat_interleave(n, 0)
    kw = {}
    if not greedy:
        if seeds is None:
            seeds = torch.randint(0, 2 ** 62, (G,), generator=None).tolist()
        gens = [torch.Generator(device=device).manual_seed(seed_of(s, j)) for s in seeds for j in range(n)]
        kw["logits_processor"] = _sampling_processors(sampling, gens)
    # do_sample=False in both cases: transformers then adds no warpers of its own and takes the argmax of the
    # processed scores, which with the Gumbel noise above is the sample. The sampling-only flags are pinned to
    # transformers' neutral defaults so that values a checkpoint's generation_config carries are not merged in
    # (generate fills only None fields from it, and warns that they are unused under do_sample=False).
    gc = GenerationConfig(max_new_tokens=int(sampling.max_new_tokens), pad_token_id=int(pad_token_id),
                          eos_token_id=int(eos_token_id), do_sample=False, temperature=1.0, top_p=1.0, top_k=50,
                          typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    was_training = policy.training
    policy.eval()
    try:
        out = policy.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=gc, **kw)
    finally:
        policy.train(was_training)
    resp = out[:, ids.shape[1]:].cpu()
    mask, truncated = _response_mask(resp, eos_token_id)
    T = max(int(mask.sum(-1).max()), 1)
    resp, mask = resp[:, :T].masked_fill(mask[:, :T] == 0, int(pad_token_id)), mask[:, :T]
    texts = ([tokenizer.decode(r[m > 0].tolist(), skip_special_tokens=True) for r, m in zip(resp, mask)]
             if tokenizer is not None else [""] * resp.shape[0])
    group = torch.arange(len(prompt_ids)).repeat_interleave(n)
    return Rollout(ids.to(device), att.to(device), resp.to(device), mask.to(device), truncated.to(device),
                   group.to(device), list(prompts), texts)


def shape_rewards(rewards: Tensor, rollout: Rollout, *, truncated_penalty: float = 0.0,
                  overlong_buffer: int = 0, max_new_tokens: Optional[int] = None) -> Tensor:
    """The task reward after the run's treatment of long responses.

    - ``truncated_penalty`` p ≥ 0: a truncated response (no EOS within the budget) gets r − p (TRL's
      ``missing_eos_penalty``; 0 keeps truncated responses as they are).
    - ``overlong_buffer`` L_c ≥ 1: DAPO's soft overlong punishment (Yu et al. 2503.14476, Eq. 13) with
      L_max = ``max_new_tokens``: r + ((L_max − L_c) − |y|)/L_c for L_max − L_c < |y| ≤ L_max, else r
      (a truncated response has |y| = L_max: −1).

    Returns ``(B,)`` float32.
    """
    r = rewards.float()
    if truncated_penalty:
        r = r - float(truncated_penalty) * rollout.truncated.float()
    if overlong_buffer:
        if max_new_tokens is None:
            raise InputError("overlong_buffer needs max_new_tokens (L_max)")
        lc, lmax = float(overlong_buffer), float(max_new_tokens)
        over = rollout.lengths.float() - (lmax - lc)
        r = r + torch.where(over > 0, -over / lc, torch.zeros_like(over))
    return r
