"""Evaluation harness: basket completion + cold start, category probe, perplexity, baselines, report.

``prodrep evaluate`` (:mod:`prodrep.evaluate`) ties together :mod:`.protocol` (queries,
candidates, ranking with the tie-break rule), :mod:`.metrics`, :mod:`.baselines`, :mod:`.probe` and
:mod:`.report`.
"""

from common.evaluation.metrics import ndcg_at_k, recall_at_k, recall_curve
from common.evaluation.protocol import EvalContext, build_context, evaluate_scores, top_k

__all__ = ["EvalContext", "build_context", "evaluate_scores", "ndcg_at_k", "recall_at_k", "recall_curve", "top_k"]
