"""ROUGE as an `evaluate` metric module kept in the repo, because `evaluate.load("rouge")` fetches its
script from the hub. Built on Google's `rouge-score` with the hub metric's defaults: rouge1/2/L/Lsum,
no stemmer, F-measure, aggregated by rouge-score's BootstrapAggregator (its "mid" value).

Load it with `evaluate.load("stages/headline_rouge")`. `return_ci=True` adds the aggregator's 95%
interval as `<type>_low` / `<type>_high`; `seed` makes the bootstrap reproducible; `use_aggregator=False`
returns per-row F-measures.
"""

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer, scoring

DEFAULT_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


class HeadlineRouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE F-measure (rouge-score), hub-metric defaults, optional bootstrap interval.",
            citation="Lin, Chin-Yew. ROUGE: A Package for Automatic Evaluation of Summaries. 2004.",
            features=datasets.Features(
                {"predictions": datasets.Value("string", id="sequence"), "references": datasets.Value("string", id="sequence")}
            ),
        )

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False, return_ci=False, seed=None):
        rouge_types = rouge_types or DEFAULT_TYPES
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
        if not use_aggregator:
            return {t: [s[t].fmeasure for s in scores] for t in rouge_types}
        if seed is not None:
            # the aggregator resamples with numpy's global generator; seeding here, right before it, makes
            # identical predictions get identical scores (evaluate's own bookkeeping may draw from it too)
            np.random.seed(seed)
        aggregator = scoring.BootstrapAggregator()
        for s in scores:
            aggregator.add_scores(s)
        result = {}
        for t, agg in aggregator.aggregate().items():
            result[t] = agg.mid.fmeasure
            if return_ci:
                result[f"{t}_low"], result[f"{t}_high"] = agg.low.fmeasure, agg.high.fmeasure
        return result
