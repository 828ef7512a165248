"""moalign: align language models to several objectives at once.

The names below load on first use (``import moalign`` stays light)::

    import moalign

    out = moalign.decode(["Name a colour."], moalign.RMOD(k=2, block_size=8), max_new_tokens=16)
"""

from __future__ import annotations

import importlib

from moalign.errors import MoalignError, SettingError

__version__ = "0.1.0"

#: public name -> module that defines it (imported lazily, PEP 562)
_LAZY = {
    # decoding
    "decode": "moalign.api",
    "Decoded": "moalign.api",
    "Server": "moalign.api",
    "load_results": "moalign.api",
    "load_method": "moalign.api",
    "Sample": "moalign.decoding.sample",
    "BestOfN": "moalign.decoding.best_of_n",
    "CD": "moalign.decoding.cd",
    "RMOD": "moalign.decoding.rmod",
    "Darwin": "moalign.decoding.darwin",
    "SampleReplace": "moalign.decoding.darwin",
    "MutateBoN": "moalign.decoding.darwin",
    "MethodSpec": "moalign.decoding.registry",
    "register_method": "moalign.decoding.registry",
    "available_methods": "moalign.decoding.registry",
    "load_policy": "moalign.policies",
    "load_prompts": "moalign.data.prompts",
    # objectives
    "Objective": "moalign.objectives.base",
    "CallableObjective": "moalign.objectives.base",
    "resolve_objectives": "moalign.objectives.base",
    "register_objective": "moalign.objectives.base",
    "available_objectives": "moalign.objectives.base",
    # evaluation
    "evaluate": "moalign.evaluation.evaluate",
    # training (transformers / TRL load only when one of these is used)
    "MultiObjectiveDPOConfig": "moalign.training.dpo_config",
    "MultiObjectiveDPOTrainer": "moalign.training.dpo",
    "IAMAConfig": "moalign.training.grpo",
    "IAMATrainer": "moalign.training.grpo",
}

__all__ = ["MoalignError", "SettingError", "__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
