"""Faithfulness evaluation of attributions: the metrics of the DynamicLRP paper and more.

Modules (import the submodule you need; nothing here imports Captum, Zennit or LxT eagerly):

- :mod:`.task`: :class:`Task` (a model and a labelled set reduced to one shape) and
  :class:`Problem` (one batch to attribute);
- :mod:`.perturbation`: MoRF / LeRF perturbation curves of images (pixels or patches) and token
  sequences, AUC, ABPC, comprehensiveness, sufficiency;
- :mod:`.localisation`: relevance mass accuracy, relevance rank accuracy, pointing game against
  a ground-truth mask;
- :mod:`.qa`: extractive QA, top-k attributed token inside the predicted (TPS) or gold (TGS)
  span, span IoU;
- :mod:`.sanity`: cascading model-parameter randomisation (Adebayo et al.);
- :mod:`.methods`: attribution methods behind one interface: every dynamiclrp preset, Captum's
  baselines, Zennit composites, LxT in its own process, a random ranking;
- :mod:`.synthetic_images`, :mod:`.synthetic_text`: generated datasets whose evidence is known.

``docs/evaluation.md`` defines every metric; ``benchmarks/faithfulness.py`` runs them all.
"""

from __future__ import annotations

from .localisation import pointing_game, relevance_mass_accuracy, relevance_rank_accuracy
from .methods import Method, available_methods, make_method
from .perturbation import PerturbationResult, auc, image_perturbation, token_perturbation
from .qa import span_iou, top_k_in_span
from .sanity import RandomisationResult, parameter_randomisation, spearman
from .task import Problem, Task, feature_relevance

__all__ = [
    "Method",
    "PerturbationResult",
    "Problem",
    "RandomisationResult",
    "Task",
    "auc",
    "available_methods",
    "feature_relevance",
    "image_perturbation",
    "make_method",
    "parameter_randomisation",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "span_iou",
    "spearman",
    "token_perturbation",
    "top_k_in_span",
]
