"""Built-in objectives that run on CPU without downloads. Models load lazily on first use and are cached.

=============  ==================================================================================  ===========
name           score of (prompt, response)                                                         range
=============  ==================================================================================  ===========
``non_toxic``  ``1 - P(offensive | response)``, alt-profanity-check (calibrated linear SVM)          [0, 1]
``positive``   VADER compound sentiment of the response                                            [-1, 1]
``relevant``   cosine similarity of all-MiniLM-L6-v2 embeddings of prompt and response             [-1, 1]
``concise``    ``-(number of words) / 100``: every 100 words cost 1                                 (-inf, 0]
``helpful``    shipped Bradley-Terry reward model (MiniLM features, HH helpful pairs)              logit
``harmless``   shipped Bradley-Terry reward model (MiniLM features, HH harmless pairs)             logit
=============  ==================================================================================  ===========

Every objective scores an empty response (a partial response is empty before its first block).
The device of the neural objectives is ``$MOALIGN_OBJECTIVE_DEVICE`` (default ``cpu``) or ``.to(device)``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from moalign.errors import MoalignError
from moalign.objectives.base import Objective, register_objective

SHIPPED_REWARD_MODELS = ("helpful", "harmless")


def default_objective_device() -> str:
    return os.environ.get("MOALIGN_OBJECTIVE_DEVICE", "cpu")


class NonToxicObjective(Objective):
    """``1 - P(offensive)`` of the response text from alt-profanity-check (prompt ignored)."""

    name = "non_toxic"
    batch_size = 256

    def __init__(self):
        self._predict = None

    def _score(self, prompts, responses):
        if self._predict is None:
            try:
                from profanity_check import predict_prob
            except ImportError:
                raise MoalignError(
                    "objective non_toxic needs alt-profanity-check: pip install alt-profanity-check"
                ) from None
            self._predict = predict_prob
        p = self._predict([r if r.strip() else "" for r in responses])
        return 1.0 - torch.as_tensor(p, dtype=torch.float64)

    def describe(self):
        return {
            **super().describe(),
            "model": "alt-profanity-check",
            "formula": "1 - P(offensive | response)",
        }


class PositiveObjective(Objective):
    """VADER compound sentiment score of the response in [-1, 1] (0 for an empty response)."""

    name = "positive"
    batch_size = 256

    def __init__(self):
        self._analyzer = None

    def _score(self, prompts, responses):
        if self._analyzer is None:
            try:
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
            except ImportError:
                raise MoalignError(
                    "objective positive needs vaderSentiment: pip install vaderSentiment"
                ) from None
            self._analyzer = SentimentIntensityAnalyzer()
        return [float(self._analyzer.polarity_scores(r)["compound"]) if r.strip() else 0.0 for r in responses]

    def describe(self):
        return {**super().describe(), "model": "vaderSentiment", "formula": "VADER compound(response)"}


class RelevantObjective(Objective):
    """Cosine similarity of unit all-MiniLM-L6-v2 embeddings of the prompt (left-truncated) and response."""

    name = "relevant"
    batch_size = 64

    def __init__(self, device: str | None = None):
        self.device = device or default_objective_device()

    def to(self, device: str) -> RelevantObjective:
        self.device = str(torch.device(device))
        return self

    def _score(self, prompts, responses):
        from moalign.objectives.embeddings import encode

        p = encode(prompts, side="left", device=self.device)
        q = encode(responses, side="right", device=self.device)
        return (p * q).sum(dim=1)  # both unit-norm

    def describe(self):
        return {**super().describe(), "model": "all-MiniLM-L6-v2", "formula": "cos(e(prompt), e(response))"}


class ConciseObjective(Objective):
    """Length score: ``-n_words / scale`` or, with a target, ``-|n_words - target| / scale``.

    ``n_words`` counts whitespace-separated words. The registered ``concise`` has no target and
    ``scale = 100`` (every 100 words cost 1; an empty response scores 0, the maximum).
    """

    name = "concise"
    batch_size = 4096

    def __init__(self, target_words: int | None = None, scale: float = 100.0):
        if not scale > 0:
            raise MoalignError(f"concise: scale must be > 0, got {scale}")
        self.target_words = target_words
        self.scale = float(scale)

    def _score(self, prompts, responses):
        n = torch.tensor([len(r.split()) for r in responses], dtype=torch.float64)
        if self.target_words is not None:
            n = (n - self.target_words).abs()
        return -n / self.scale

    def describe(self):
        return {**super().describe(), "target_words": self.target_words, "scale": self.scale}


def shipped_reward_model_path(name: str) -> Path:
    """Folder of a reward model shipped in ``moalign/resources/reward_models/NAME``."""
    p = Path(str(resources.files("moalign") / "resources" / "reward_models" / name))
    if not (p / "reward_config.json").exists():
        raise MoalignError(
            f"shipped reward model {name!r} not found under {p} (is the package installed fully?)"
        )
    return p


def _shipped(name: str):
    def factory() -> Objective:
        from moalign.objectives.bradley_terry import BradleyTerryObjective

        return BradleyTerryObjective.load(shipped_reward_model_path(name), device=default_objective_device())

    factory.__name__ = f"shipped_{name}"
    factory.__doc__ = f"The shipped Bradley-Terry reward model {name!r}."
    return factory


def _register_default(name: str, factory) -> None:
    # a user's own registration under the same name (made before the built-ins load) wins
    register_objective(name, factory, default=True)


_register_default("non_toxic", NonToxicObjective)
_register_default("positive", PositiveObjective)
_register_default("relevant", RelevantObjective)
_register_default("concise", ConciseObjective)
for _n in SHIPPED_REWARD_MODELS:
    _register_default(_n, _shipped(_n))
