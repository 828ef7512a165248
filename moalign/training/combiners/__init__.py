"""Gradient combiners for multi-objective training (pure tensor functions, no model code).

Per training step the trainer has, for every objective ``k = 0..K-1``, a loss value ``l_k`` and a gradient
``g_k``. A *gradient* is given either as a list of parameter-shaped tensors (one entry per trainable
parameter, ``None`` meaning "this objective does not touch that parameter", i.e. zeros) or as one tensor
(e.g. a flattened vector), which is treated as a list with one entry. All objectives must list the same
parameters in the same order with the same shapes.

Every combiner here produces a direction of the form ``d = sum_k alpha_k g_k`` (PCGrad included: each
projection subtracts a multiple of an *original* gradient, so its result is also a linear combination of
the ``g_k``, see :class:`PCGradCombiner`). The coefficients ``alpha`` depend on the gradients only through
the ``K x K`` Gram matrix ``G_ij = <g_i, g_j>``, so a trainer can accumulate ``G`` itself (parameter by
parameter, or all-reduced across data-parallel workers), call :meth:`Combiner.weights` /
:meth:`Combiner.weights_and_stats`, and form ``d`` with :func:`apply_weights` without ever holding more
than the K gradient copies.

Combiners (registered names, see :func:`get_combiner`):

``linear``           fixed weights ``w / sum(w)`` (default uniform: the mean of the gradients).
``mgda``             ``alpha = argmin_{alpha in simplex} ||sum_k alpha_k g_k||^2`` (Desideri; Sener & Koltun).
``mgda-normalized``  the same min-norm problem on unit gradients ``u_k = g_k / ||g_k||`` and the step
                     ``d = sum_k w_k u_k`` (so the reported raw coefficients are ``alpha_k = w_k / ||g_k||``);
                     ``apply_to="raw"`` instead applies ``w`` to the raw gradients.
``mgda-decoupled``   ``alpha`` = min-norm weights of the loss-normalised gradients ``g_k / l_k`` (Gram
                     ``G_ij / (l_i l_j)``), applied to the RAW gradients: ``d = sum_k alpha_k g_k``.
                     Requires ``l_k > 0``.
``groupdro``         online mirror ascent on the simplex: ``q <- q * exp(eta * l)``, normalised; stateful.
``pcgrad``           Yu et al. 2020 gradient surgery with a seeded random projection order.

Conventions: ``alpha`` is always a float64 CPU tensor of shape ``[K]`` holding the coefficients applied to
the raw gradients (``sum(alpha) == 1`` for every combiner except ``mgda-normalized`` with the default
``apply_to`` and ``pcgrad`` with ``reduction="sum"``). Bad input raises :class:`moalign.errors.MoalignError`.

Layout: the shared weighting (Gram matrix, applying ``alpha``, per-step statistics, input checks) in
:mod:`.weighting`, the min-norm solver in :mod:`.min_norm`, the :class:`Combiner` base and the registry in
:mod:`.base`, and one module per combiner; a new combiner is one module and one ``COMBINERS.register`` line.
"""

from moalign.training.combiners.base import (
    COMBINERS,
    Combiner,
    CombineResult,
    available_combiners,
    combiner_from_settings,
    get_combiner,
    register_combiner,
)
from moalign.training.combiners.groupdro import GroupDROCombiner
from moalign.training.combiners.linear import LinearCombiner
from moalign.training.combiners.mgda import MGDACombiner
from moalign.training.combiners.mgda_decoupled import MGDADecoupledCombiner
from moalign.training.combiners.mgda_normalized import MGDANormalizedCombiner
from moalign.training.combiners.min_norm import min_norm_weights
from moalign.training.combiners.pcgrad import PCGradCombiner
from moalign.training.combiners.weighting import apply_weights, combine_stats, gram_matrix

__all__ = [
    "COMBINERS",
    "CombineResult",
    "Combiner",
    "GroupDROCombiner",
    "LinearCombiner",
    "MGDACombiner",
    "MGDADecoupledCombiner",
    "MGDANormalizedCombiner",
    "PCGradCombiner",
    "apply_weights",
    "available_combiners",
    "combine_stats",
    "combiner_from_settings",
    "get_combiner",
    "gram_matrix",
    "min_norm_weights",
    "register_combiner",
]
