"""udrra: RLHF and preference-learning algorithms as compositions of four loss components.

Every algorithm is one configured composition of a **target** distribution, a **sample source**, a **reward
estimate** and a **reference term** (an algorithm file in TOML); the loss is derived from the components and
the framework computes the distribution training must converge to, then checks it on a contextual bandit.

    >>> import udrra
    >>> dpo = udrra.load("dpo", overrides={"target.beta": 0.5})
    >>> bandit = udrra.Bandit.random(P=2, K=4, seed=0)
    >>> result = udrra.verify(dpo, bandit)
    >>> result.tv < 1e-4
    True
"""

from .algorithm import Algorithm, load
from .bandit import Bandit
from .batch import PairBatch, SampleBatch
from .config import catalog_names
from .errors import ConfigError, InputError, TargetError, UdrraError
from .loss import LossOutput
from .verify import VerifyResult, verify
from .sequence import SequenceBandit

__all__ = ["Algorithm", "load", "Bandit", "SequenceBandit", "PairBatch", "SampleBatch", "LossOutput", "verify",
           "VerifyResult",
           "catalog_names", "ConfigError", "InputError", "TargetError", "UdrraError"]
__version__ = "0.1.0"
