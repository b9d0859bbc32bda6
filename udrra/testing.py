"""Verify your own algorithm's target in your own test suite.

A test of a new composition can be this short (``examples/test_my_algorithm.py`` runs in udrra's CI)::

    import udrra
    from hypothesis import given
    from udrra.testing import assert_reaches_target, bandits, settings

    ALGO = udrra.load("my_algorithm.toml")

    @settings()
    @given(bandit=bandits(P=2, K=4))
    def test_my_algorithm_reaches_its_declared_target(bandit):
        assert_reaches_target(ALGO, bandit)

- :func:`bandits` / :func:`sequence_bandits`: hypothesis strategies drawing :class:`udrra.Bandit` /
  :class:`udrra.SequenceBandit` instances (prompts, responses, rewards or preferences, pair coverage).
- :func:`assert_reaches_target`: the composition's derived target must be the kind its ``[target]`` declares, and
  training (exact population loss, or sampled mini-batches) must reach it; a failure prints target vs learned per
  prompt, the TV and the tolerance.
- :func:`assert_target_equals`: udrra's derived target must equal your own closed form on a bandit.
- :func:`settings`: hypothesis settings for these tests (no deadline: each example trains a policy; the number
  of examples from ``pytest --udrra-examples N``, default 5, through the ``udrra`` pytest plugin).

Needs ``hypothesis`` for the strategies (``pip install 'udrra[test]'``); the assertions need only torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .algorithm import Algorithm, load
from .bandit import Bandit
from .errors import InputError
from .sequence import SequenceBandit
from .verify import VerifyResult, total_variation, verify

__all__ = ["bandits", "sequence_bandits", "assert_reaches_target", "assert_target_equals", "settings",
           "DEFAULT_EXAMPLES", "REWARDS", "PREFERENCES", "COVERAGES"]

#: examples per ``@given`` test under :func:`settings` (``pytest --udrra-examples N`` changes it)
DEFAULT_EXAMPLES = 5
_config = {"examples": DEFAULT_EXAMPLES}
#: how drawn bandits score responses: Gaussian rewards (scaled by ``reward_scale``), or preferences only
REWARDS = ("gaussian", "none")
#: how drawn bandits' preferences arise: Bradley–Terry in the reward, or arbitrary probabilities p(y ≻ y')
PREFERENCES = ("bradley_terry", "random")
#: which ordered pairs the pair distribution μ covers: all, or a random spanning subset per prompt
COVERAGES = ("full", "partial")


def _hyp():
    try:
        import hypothesis
        from hypothesis import strategies as st
    except ImportError as e:  # pragma: no cover
        raise ImportError("udrra.testing's strategies need hypothesis: pip install 'udrra[test]'") from e
    return hypothesis, st


def _strategy(st, v: Any, name: str):
    """An int / float / string argument as a constant strategy; a strategy as itself."""
    if hasattr(v, "example") and hasattr(v, "map"):
        return v
    if isinstance(v, (int, float, str)) and not isinstance(v, bool):
        return st.just(v)
    raise InputError(f"{name} must be a value or a hypothesis strategy, got {type(v).__name__}")


def bandits(P: Any = None, K: Any = None, *, reward: str = "gaussian", preference: str = "bradley_terry",
            coverage: str = "full", reward_scale: Any = 1.0, ref_concentration: float = 2.0):
    """A hypothesis strategy of :class:`udrra.Bandit`.

    Args:
        P: prompts (int or strategy; default 1–3). K: responses per prompt (default 2–5).
        reward: ``"gaussian"`` (r ∼ N(0, reward_scale²)) or ``"none"`` (preferences only: compositions that need a
            scalar reward raise :class:`udrra.TargetError`). See :data:`REWARDS`.
        preference: ``"bradley_terry"`` (σ(r(y) − r(y'))) or ``"random"`` (p(y ≻ y') uniform in (0.05, 0.95),
            p(y' ≻ y) = 1 − p(y ≻ y')). See :data:`PREFERENCES`.
        coverage: ``"full"`` (μ uniform over every ordered pair of distinct responses) or ``"partial"`` (μ on a
            random spanning tree of each prompt's responses plus some further pairs, in both orders: the pairs a
            dataset covers). See :data:`COVERAGES`.
        reward_scale: standard deviation of the rewards (float or strategy).
        ref_concentration: Dirichlet concentration of π_ref (floored at 0.02 and renormalised: full support).
    Returns:
        ``SearchStrategy[Bandit]``; shrinks towards small P, K and seed 0.
    Raises:
        InputError: an unknown ``reward`` / ``preference`` / ``coverage``, or ``reward="none"`` with Bradley–Terry
            preferences (they need a reward).
    """
    _, st = _hyp()
    for name, v, valid in (("reward", reward, REWARDS), ("preference", preference, PREFERENCES),
                           ("coverage", coverage, COVERAGES)):
        if v not in valid:
            raise InputError(f"bandits({name}={v!r}): valid values are {', '.join(valid)}")
    if reward == "none" and preference == "bradley_terry":
        raise InputError("bandits(reward='none') needs preference='random': Bradley–Terry preferences come from a "
                         "reward")
    Ps = _strategy(st, P, "P") if P is not None else st.integers(1, 3)
    Ks = _strategy(st, K, "K") if K is not None else st.integers(2, 5)
    scales = _strategy(st, reward_scale, "reward_scale")

    @st.composite
    def one(draw):
        p, k, seed, scale = draw(Ps), draw(Ks), draw(st.integers(0, 2 ** 31 - 1)), draw(scales)
        return _make_bandit(int(p), int(k), seed, float(scale), reward, preference, coverage, ref_concentration)

    return one()


def _make_bandit(P: int, K: int, seed: int, scale: float, reward: str, preference: str, coverage: str,
                 ref_concentration: float) -> Bandit:
    base = Bandit.random(P=P, K=K, seed=seed, reward_scale=scale, ref_concentration=ref_concentration)
    g = torch.Generator().manual_seed(seed + 1)
    pref = None
    if preference == "random":
        u = 0.05 + 0.9 * torch.rand(P, K, K, generator=g, dtype=torch.float64)
        upper = torch.triu(torch.ones(K, K, dtype=torch.bool), 1)
        pref = torch.where(upper, u, 1 - u.transpose(1, 2))
        pref = torch.where(torch.eye(K, dtype=torch.bool), torch.full_like(pref, 0.5), pref)
    mu = None
    if coverage == "partial":
        mu = torch.zeros(P, K, K, dtype=torch.float64)
        for p in range(P):
            order = torch.randperm(K, generator=g).tolist()
            for i in range(1, K):                                   # a random spanning tree: connected
                a, b = order[i], order[int(torch.randint(0, i, (1,), generator=g))]
                mu[p, a, b] = mu[p, b, a] = 1.0
            extra = torch.rand(K, K, generator=g) < 0.25
            mu[p] = torch.maximum(mu[p], (extra | extra.T).double())
        mu = mu * (1 - torch.eye(K, dtype=torch.float64))
    return Bandit(base.pi_ref, None if reward == "none" else base.reward, pref, mu)


def sequence_bandits(P: Any = None, vocab: Any = None, max_len: Any = None, *, reward_mode: str = "response",
                     reward_scale: Any = 1.0):
    """A hypothesis strategy of :class:`udrra.SequenceBandit` (responses of up to ``max_len`` tokens over
    ``vocab`` tokens, EOS = the last; :meth:`udrra.SequenceBandit.random`).

    Args:
        P: prompts (default 1–2). vocab: V ≥ 2 (default 2–3). max_len: L ≥ 1 (default 1–3; V = 3, L = 3 is 15
            responses per prompt). reward_mode: ``response`` (one reward per response), ``token`` (a sum of
            per-token rewards) or ``length`` (a reward per length). reward_scale: float or strategy.
    Returns:
        ``SearchStrategy[SequenceBandit]``.
    """
    _, st = _hyp()
    Ps = _strategy(st, P, "P") if P is not None else st.integers(1, 2)
    Vs = _strategy(st, vocab, "vocab") if vocab is not None else st.integers(2, 3)
    Ls = _strategy(st, max_len, "max_len") if max_len is not None else st.integers(1, 3)
    scales = _strategy(st, reward_scale, "reward_scale")

    @st.composite
    def one(draw):
        return SequenceBandit.random(P=int(draw(Ps)), vocab=int(draw(Vs)), max_len=int(draw(Ls)),
                                     seed=draw(st.integers(0, 2 ** 31 - 1)), reward_scale=float(draw(scales)),
                                     reward_mode=reward_mode)

    return one()


def settings(**overrides: Any):
    """``hypothesis.settings`` for target tests: ``max_examples`` = ``pytest --udrra-examples N`` (default
    :data:`DEFAULT_EXAMPLES`), no deadline (each example trains a policy), the ``too_slow`` health check off.
    Keyword arguments override any of them."""
    hypothesis, _ = _hyp()
    kw = dict(max_examples=_config["examples"], deadline=None,
              suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
    kw.update(overrides)
    return hypothesis.settings(**kw)


# ------------------------------------------------------------------------------------------------ assertions


def _algorithm(algorithm: Union[str, Path, Algorithm]) -> Algorithm:
    return algorithm if isinstance(algorithm, Algorithm) else load(str(algorithm))


def _table(target: Tensor, learned: Tensor, labels=("target", "learned")) -> str:
    """Per prompt: the two distributions side by side and their TV."""
    lines = []
    for p in range(target.shape[0]):
        tv = float(total_variation(learned[p:p + 1], target[p:p + 1]).max())
        lines.append(f"  prompt {p}: TV {tv:.3g}")
        lines.append(f"    {labels[0]:>8}: " + " ".join(f"{x:.4f}" for x in target[p].tolist()))
        lines.append(f"    {labels[1]:>8}: " + " ".join(f"{x:.4f}" for x in learned[p].tolist()))
    return "\n".join(lines)


def assert_reaches_target(algorithm: Union[str, Path, Algorithm], bandit: Union[Bandit, SequenceBandit], *,
                          exact: bool = True, tol: Optional[float] = None, target: str = "declared",
                          steps: Optional[int] = None, seed: int = 0) -> VerifyResult:
    """Assert that ``algorithm`` converges to its target on ``bandit``.

    Two checks, in order:

    1. ``target="declared"`` (default): the target udrra derives from the four components has the kind the
       ``[target]`` table declares (a composition that declares ``boltzmann`` but differentiates k1 in the loss
       derives ``argmax``: the declaration is wrong, whatever training does). ``target="derived"`` skips this
       (e.g. ``dpo_iter``, whose reference resets make the target ``iterated``).
    2. Training (:func:`udrra.verify`: exact population loss, or sampled mini-batches with ``exact=False``) reaches
       the derived target: max-over-prompts TV < ``tol`` (default 1e-4 exact, 2e-2 sampled), or, for hinge targets
       without a unique distribution, their margin / objective check.

    Args:
        algorithm: a loaded algorithm, a catalog name or a ``.toml`` path. bandit: a :class:`udrra.Bandit` or
            :class:`udrra.SequenceBandit`. steps, seed: passed to :func:`udrra.verify`.
    Returns:
        The :class:`udrra.VerifyResult` (when the assertion holds).
    Raises:
        AssertionError: a check fails; the message names the algorithm and shows declared vs derived kinds, or
            target vs learned per prompt with the TV and the tolerance.
        udrra.TargetError: the composition has no target on this bandit (e.g. partial coverage for a pair loss
            whose target needs every pair).
    """
    algo = _algorithm(algorithm)
    derived = algo.derived_target()
    declared = algo.components.target.kind
    if target not in ("declared", "derived"):
        raise InputError(f"target must be 'declared' or 'derived', got {target!r}")
    if target == "declared" and derived.kind != declared:
        raise AssertionError(f"{algo.name}: [target] declares {declared!r}, but its components derive "
                             f"{derived.kind!r}: {derived.formula}" + (f" — {derived.note}" if derived.note else "")
                             + "; fix the composition, or pass target='derived' to check the derived target")
    res = verify(algo, bandit, exact=exact, steps=steps, seed=seed, tolerance=tol)
    if res.passed:
        return res
    mode = "exact population" if exact else "sampled"
    if res.target is None:
        raise AssertionError(f"{algo.name} ({mode} training, {res.steps} steps) does not reach its {res.target_kind} "
                             f"target on {bandit!r}: margin violation / objective gap {res.margin_violation:.3g} >= "
                             f"tolerance {res.tolerance:.3g}")
    raise AssertionError(f"{algo.name} ({mode} training, {res.steps} steps) does not reach its {res.target_kind} "
                         f"target on {bandit!r}: max TV {res.tv:.3g} >= tolerance {res.tolerance:.3g}\n"
                         + _table(res.target, res.learned))


def assert_target_equals(algorithm: Union[str, Path, Algorithm], bandit: Bandit,
                         expected: Union[Tensor, Callable[[Bandit], Tensor]], *, tol: float = 1e-8) -> None:
    """Assert that udrra's derived target of ``algorithm`` on ``bandit`` equals your closed form.

    Args:
        expected: ``(P, K)`` probabilities (rows summing to 1), or ``bandit -> (P, K)``.
        tol: max-over-prompts total variation allowed (float64 solvers: 1e-8 by default).
    Raises:
        AssertionError: the two differ; the message shows both per prompt with their TV.
        InputError: ``expected`` has the wrong shape. udrra.TargetError: no unique derived target.
    """
    algo = _algorithm(algorithm)
    exp = torch.as_tensor(expected(bandit) if callable(expected) else expected, dtype=torch.float64)
    got = algo.target_distribution(bandit).double()
    if exp.shape != got.shape:
        raise InputError(f"expected must have shape {tuple(got.shape)} (prompts × responses), got {tuple(exp.shape)}")
    tv = float(total_variation(got, exp).max())
    if not tv < tol:
        raise AssertionError(f"{algo.name}: udrra's derived {algo.derived_target().kind} target differs from the "
                             f"expected closed form on {bandit!r}: max TV {tv:.3g} >= {tol:.3g}\n"
                             + _table(exp, got, labels=("expected", "derived")))
