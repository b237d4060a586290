"""The evaluation gate: promote a candidate model only if it is not worse than the one in service.

:func:`compare_models` scores a holdout window (the newest records, which neither model was
trained on) with the model in service and the candidate, and compares them on these criteria:

``reconstruction_loss`` (lower is better)
    Mean squared reconstruction error of the auto-encoder on the holdout, in the model's own
    feature space. Two models whose feature mappers were fitted on different windows scale the
    features differently, so this is a like-for-like comparison only up to that rescaling; it
    still catches a candidate that has not learnt the data.
``score_separation`` (higher is better)
    How far the score's tail stands out from the bulk, without labels: ``(mean of the top 1 %
    of the scores - median) / spread``, ``spread`` being the interquartile range of the scores
    floored at 0.1 % of their ``q1..q99`` range, so that a collapsed bulk does not make it
    explode (it then lands in the thousands). It is scale-free (the two models' scores need
    not share a scale) and robust in the bulk (quantiles, not moments). A model that separates
    anomalies from normal records puts its top percent many bulk widths above the median; a
    model whose score is noise has a tail a few widths out. A model whose embeddings collapse
    (most scores 0) also scores high: like every criterion here, it is a proxy.
``alert_rate_error`` (lower is better)
    ``|share of holdout scores above the model's calibrated threshold - its alert_rate|``: how
    well the threshold set on the training window transfers to new data.
``cluster_stability`` (higher is better)
    The holdout embeddings are split into two random halves, k-means (``k`` = the model's
    number of clusters) is fitted on each, both clusterings label every holdout embedding, and
    the adjusted Rand index of the two labelings is taken; the mean over ``stability_resamples``
    splits (the same splits for both models). An embedding with real cluster structure gives the
    same clusters whatever half they are learnt from (ARI near 1).
``rejected_rate`` (lower is better)
    Share of the holdout records the model's feature mapper rejects (a schema it does not know).
``auc`` (higher is better), only when the holdout has binary labels with both classes
    ROC AUC of the scores against the labels.

Decision
--------
The candidate is promoted when there is no model in service, or when it is not worse than the
model in service by more than the margin on every *binding* criterion:

* without labels, every criterion is binding;
* with labels (``auc`` present), ``auc`` is decisive: it and ``rejected_rate`` are binding, and
  the unsupervised criteria are advisory (shown in the table and in the reasons, but they do not
  refuse a candidate whose AUC is not worse). A candidate with a worse AUC is refused whatever
  the other criteria say. ``auc_decides=False`` makes every criterion binding with labels too.

The unsupervised criteria are proxies, and on real data they disagree with the labels often
enough (on Shuttle, a model stopped after one epoch has *more* stable clusters than a trained
one with an AUC of 0.99 against 0.36) that letting them overrule the AUC would keep bad models
in service.

"Worse by more than the margin" is relative for the unbounded criteria
(``reconstruction_loss``, ``score_separation``: worse by more than ``margin x |current
value|``) and absolute for those bounded in ``[0, 1]`` (``[-0.5, 1]`` for the adjusted Rand
index): ``auc``, ``cluster_stability``, ``alert_rate_error`` and ``rejected_rate`` (worse by
more than ``margin``: 2 points of AUC, 2 percentage points of alert rate). ``margins`` sets the
margin of single criteria (the proxies are noisy: a relative 2 % on the score separation is
tight). A criterion that cannot be computed for either model (e.g. cluster stability on a
holdout smaller than ``2 k``) is skipped; one the candidate cannot compute while the current
model can counts against the candidate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score

from stream_l2ae.datasets import Dataset
from stream_l2ae.detector import L2AEDetector
from stream_l2ae.errors import ConfigError
from stream_l2ae.evaluation import roc_auc
from stream_l2ae.kmeans import fit_kmeans
from stream_l2ae.training import embed

__all__ = [
    "CRITERIA",
    "Criterion",
    "GateDecision",
    "ModelEvaluation",
    "compare_models",
    "evaluate_model",
    "score_separation",
]

#: Most embeddings used to measure the cluster stability (a random sample of larger holdouts).
STABILITY_SAMPLE = 20_000
_EPS = 1e-12


@dataclass(frozen=True)
class Criterion:
    name: str
    better: str  # "lower" or "higher"
    bounded: bool  # absolute margin when True, relative otherwise
    description: str


CRITERIA: tuple[Criterion, ...] = (
    Criterion("auc", "higher", True, "ROC AUC against the holdout labels (decisive)"),
    Criterion("reconstruction_loss", "lower", False, "mean reconstruction error"),
    Criterion("score_separation", "higher", False, "(top 1 % mean - median) / IQR of the scores"),
    Criterion("alert_rate_error", "lower", True, "|holdout alert rate - configured rate|"),
    Criterion("cluster_stability", "higher", True, "ARI of k-means on two random halves"),
    Criterion("rejected_rate", "lower", True, "share of holdout records rejected"),
)
_BY_NAME = {criterion.name: criterion for criterion in CRITERIA}


def score_separation(scores: np.ndarray, tail: float = 0.01) -> float:
    """``(mean of the top tail - median) / spread``: how many bulk widths the highest
    ``tail`` share of the scores (at least one score) stands out from the median.

    ``spread`` is the interquartile range, floored at 0.1 % of the ``q1..q99`` range (and at
    1e-12). The mean of the top share, not the ``q99`` quantile, so that a tail holding about
    1 % of the scores still counts (the quantile falls between bulk and tail there).
    ``nan`` for fewer than 2 scores.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> bulk = rng.normal(0.1, 0.01, 990)
    >>> separated = np.concatenate([bulk, rng.normal(0.5, 0.01, 10)])
    >>> mixed = np.concatenate([bulk, rng.normal(0.11, 0.01, 10)])
    >>> score_separation(separated) > 10 > score_separation(mixed)
    True
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < 2:
        return math.nan
    q01, q25, q50, q75, q99 = np.quantile(scores, [0.01, 0.25, 0.5, 0.75, 0.99])
    top = np.partition(scores, scores.size - max(1, round(tail * scores.size)))
    top_mean = float(top[scores.size - max(1, round(tail * scores.size)) :].mean())
    spread = max(q75 - q25, 1e-3 * (q99 - q01), _EPS)
    return float((top_mean - q50) / spread)


def cluster_stability(
    z: np.ndarray, n_clusters: int, *, resamples: int = 3, n_init: int = 3, seed: int = 0
) -> float:
    """Mean adjusted Rand index between k-means labelings learnt on two random halves of ``z``
    (each labels all of ``z``); ``nan`` when a half holds fewer than ``n_clusters`` points."""
    z = np.asarray(z, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if len(z) > STABILITY_SAMPLE:
        z = z[rng.choice(len(z), STABILITY_SAMPLE, replace=False)]
    if resamples < 1 or len(z) // 2 < n_clusters or n_clusters < 2:
        return math.nan
    values = []
    for r in range(resamples):
        order = rng.permutation(len(z))
        halves = order[: len(z) // 2], order[len(z) // 2 :]
        labelings = []
        for h, half in enumerate(halves):
            centroids = fit_kmeans(z[half], n_clusters, n_init=n_init, seed=seed + 2 * r + h)
            labelings.append(_nearest(z, centroids.centroids))
        values.append(adjusted_rand_score(*labelings))
    return float(np.mean(values))


def _nearest(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    distances = (
        (z**2).sum(axis=1, keepdims=True) - 2.0 * z @ centroids.T + (centroids**2).sum(axis=1)
    )
    return distances.argmin(axis=1)


@dataclass
class ModelEvaluation:
    """One model's criteria on the holdout (``nan`` where not computable) and facts about it."""

    values: dict[str, float]
    details: dict[str, Any]


def _binary_labels(y: Any) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "biuf" or not set(np.unique(y).tolist()) <= {0, 1}:
        return None
    return y.astype(np.int64)


def evaluate_model(
    detector: L2AEDetector,
    holdout: Dataset | Any,
    *,
    labels: Any = None,
    stability_resamples: int = 3,
    seed: int = 0,
) -> ModelEvaluation:
    """Every criterion of the module docstring for one model on ``holdout``.

    ``labels`` default to ``holdout.y`` for a :class:`~stream_l2ae.datasets.Dataset`; ``auc`` is
    computed when they are binary with both classes among the records the model scored.
    """
    n_total = len(holdout)
    if labels is None and isinstance(holdout, Dataset):
        labels = holdout.y
    y = _binary_labels(labels)
    X, indices, rejected = detector.features(holdout)
    values = dict.fromkeys(_BY_NAME, math.nan)
    values["rejected_rate"] = len(rejected) / n_total if n_total else math.nan
    target = float(getattr(detector.threshold, "alert_rate", detector.config.alert_rate))
    details: dict[str, Any] = {
        "version": getattr(detector, "version", None),
        "n_scored": len(indices),
        "n_rejected": len(rejected),
        "threshold": float(detector.threshold.value),
        "alert_rate": target,
    }
    if len(indices) == 0:
        return ModelEvaluation(values, details)
    z, errors = embed(detector.model, X, with_reconstruction_error=True)
    scores = detector.score_embeddings(z).score
    observed = float(np.mean(scores > detector.threshold.value))
    details["holdout_alert_rate"] = observed
    details["score_quantiles"] = {
        str(q): float(v) for q, v in zip((0.5, 0.99), np.quantile(scores, [0.5, 0.99]), strict=True)
    }
    values["reconstruction_loss"] = float(errors.float().mean().cpu())
    values["score_separation"] = score_separation(scores)
    values["alert_rate_error"] = abs(observed - target)
    values["cluster_stability"] = cluster_stability(
        z.float().cpu().numpy(),
        int(len(detector.online.centroids)),
        resamples=stability_resamples,
        n_init=3,
        seed=seed,
    )
    if y is not None:
        scored = y[indices]
        if 0 < scored.sum() < len(scored):
            values["auc"] = roc_auc(scored, scores)
    return ModelEvaluation(values, details)


@dataclass
class GateDecision:
    """The gate's verdict.

    Attributes
    ----------
    promote
        Whether the candidate should replace the model in service.
    reasons
        Why, in words: the failing criteria first (AUC first of all), or why it passes.
    rows
        One dict per criterion: ``criterion``, ``current``, ``candidate`` (``None`` where not
        computable), ``better_direction`` (``"lower"``/``"higher"``), ``margin`` (the
        criterion's), ``tolerance`` (how much worse the candidate may be, in the criterion's
        unit), ``binding`` (``False``: advisory, the AUC decides), ``verdict`` (``"better"``,
        ``"similar"``, ``"worse"``, ``"skipped"`` or, without a current model,
        ``"no current model"``).
    margin
        The default margin of the decision (``rows`` give each criterion's).
    holdout
        ``name``, ``n`` and ``labelled`` of the holdout.
    details
        ``current`` and ``candidate``: records scored and rejected, threshold, configured and
        observed alert rate, score quantiles, version.
    """

    promote: bool
    reasons: list[str]
    rows: list[dict[str, Any]]
    margin: float
    holdout: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (non-finite numbers become ``None``), for bundle metadata and logs."""
        return _json_safe(
            {
                "promote": self.promote,
                "reasons": list(self.reasons),
                "margin": self.margin,
                "rows": self.rows,
                "holdout": self.holdout,
                "details": self.details,
            }
        )

    def table(self) -> str:
        """A fixed-width text table of the criteria, then the decision and its reasons."""
        header = ("criterion", "better", "current", "candidate", "verdict")
        lines = [[*header]]
        for row in self.rows:
            lines.append(
                [
                    row["criterion"],
                    row["better_direction"],
                    _format(row["current"]),
                    _format(row["candidate"]),
                    row["verdict"]
                    + ("" if row["binding"] or row["current"] is None else " (advisory)"),
                ]
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = []
        for number, line in enumerate(lines):
            cells = [
                cell.rjust(width) if i in (2, 3) else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            ]
            out.append("  ".join(cells).rstrip())
            if number == 0:
                out.append("  ".join("-" * width for width in widths))
        n = self.holdout.get("n")
        verdict = "PROMOTE" if self.promote else "KEEP CURRENT"
        out.append(f"decision: {verdict} (margin {self.margin:g}, holdout {n} records)")
        out.extend(f"  - {reason}" for reason in self.reasons)
        return "\n".join(out)


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _compare(
    criterion: Criterion, current: float | None, candidate: float, margin: float
) -> tuple[str, float | None]:
    """``(verdict, tolerance)`` of the candidate's value against the current one."""
    if current is None:
        return ("no current model" if _finite(candidate) else "skipped"), None
    if not _finite(current) and not _finite(candidate):
        return "skipped", None
    if not _finite(candidate):
        return "worse", None
    if not _finite(current):
        return "better", None
    tolerance = margin if criterion.bounded else margin * abs(current)
    gain = candidate - current if criterion.better == "higher" else current - candidate
    if gain < -tolerance:
        return "worse", tolerance
    if gain > tolerance:
        return "better", tolerance
    return "similar", tolerance


def compare_models(
    current: L2AEDetector | None,
    candidate: L2AEDetector,
    holdout: Dataset,
    *,
    margin: float = 0.02,
    margins: Mapping[str, float] | None = None,
    auc_decides: bool = True,
    stability_resamples: int = 3,
    seed: int = 0,
) -> GateDecision:
    """Score ``holdout`` with both models and decide whether ``candidate`` replaces ``current``
    (see the module docstring for the criteria and the rule).

    Parameters
    ----------
    current
        The model in service, or ``None`` (then the candidate is promoted, and the table shows
        its values only).
    candidate
        The freshly trained model.
    holdout
        Records neither model was trained on, with labels in ``y`` when known.
    margin
        How much worse the candidate may be on any criterion: relative for unbounded criteria,
        absolute for those in ``[0, 1]``.
    margins
        Margins of single criteria, overriding ``margin`` for them, e.g.
        ``{"score_separation": 0.25}``.
    auc_decides
        With labels, let the AUC (and the rejected rate) decide alone, the unsupervised
        criteria being advisory (default); ``False``: every criterion is binding.
    stability_resamples, seed
        Random half-splits for ``cluster_stability``; both models get the same splits.

    Raises
    ------
    ConfigError
        For an empty holdout, a margin outside ``[0, 1)`` or an unknown criterion in
        ``margins``.
    """
    margin = _check_margin(margin, "margin")
    per_criterion = {name: margin for name in _BY_NAME}
    for name, value in (margins or {}).items():
        if name not in _BY_NAME:
            raise ConfigError(f"unknown gate criterion {name!r}; known: {sorted(_BY_NAME)}")
        per_criterion[name] = _check_margin(value, f"margins[{name!r}]")
    if len(holdout) == 0:
        raise ConfigError("the gate needs a non-empty holdout")
    options = {"stability_resamples": stability_resamples, "seed": seed}
    new = evaluate_model(candidate, holdout, **options)
    old = evaluate_model(current, holdout, **options) if current is not None else None
    labelled = _finite(new.values["auc"]) or (old is not None and _finite(old.values["auc"]))
    binding = set(_BY_NAME)
    if labelled and auc_decides:
        binding = {"auc", "rejected_rate"}
    rows = []
    for criterion in CRITERIA:
        if criterion.name == "auc" and not labelled:
            continue  # no labels (or a single class): not a criterion
        candidate_value = new.values[criterion.name]
        current_value = old.values[criterion.name] if old is not None else None
        verdict, tolerance = _compare(
            criterion, current_value, candidate_value, per_criterion[criterion.name]
        )
        rows.append(
            {
                "criterion": criterion.name,
                "current": current_value,
                "candidate": candidate_value,
                "better_direction": criterion.better,
                "margin": per_criterion[criterion.name],
                "tolerance": tolerance,
                "binding": criterion.name in binding,
                "verdict": verdict,
            }
        )
    promote, reasons = _decide(rows, old is None, new)
    y = holdout.y if isinstance(holdout, Dataset) else None
    return GateDecision(
        promote=promote,
        reasons=reasons,
        rows=_json_safe(rows),
        margin=margin,
        holdout={
            "name": getattr(holdout, "name", None),
            "n": len(holdout),
            "labelled": _binary_labels(y) is not None,
        },
        details=_json_safe(
            {"current": old.details if old is not None else None, "candidate": new.details}
        ),
    )


def _check_margin(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{what} must be in [0, 1), got {value!r}")
    return float(value)


def _worse_reason(row: dict[str, Any]) -> str:
    name = row["criterion"]
    how = "absolute" if _BY_NAME[name].bounded else "relative"
    decisive = " (decisive)" if name == "auc" and row["binding"] else ""
    if not _finite(row["candidate"]):
        return f"{name}{decisive}: the candidate cannot be measured on the holdout"
    return (
        f"{name}{decisive}: candidate {_format(row['candidate'])} is worse than current "
        f"{_format(row['current'])} by more than the {how} margin {row['margin']:g} "
        f"({row['better_direction']} is better)"
    )


def _decide(
    rows: Sequence[dict[str, Any]], no_current: bool, new: ModelEvaluation
) -> tuple[bool, list[str]]:
    if new.details["n_scored"] == 0:
        return False, ["the candidate rejects every holdout record: it cannot score this data"]
    if no_current:
        return True, ["no model in service: the candidate is promoted"]
    ordered = sorted(rows, key=lambda row: row["criterion"] != "auc")
    worse = [row for row in ordered if row["verdict"] == "worse"]
    failing = [_worse_reason(row) for row in worse if row["binding"]]
    if failing:
        return False, failing
    binding = [row["criterion"] for row in rows if row["binding"]]
    reasons = [f"not worse than the current model beyond the margin on {', '.join(binding)}"]
    better = [row["criterion"] for row in rows if row["verdict"] == "better"]
    if better:
        reasons.append("better on " + ", ".join(better))
    reasons.extend(
        "advisory, the AUC decides: " + _worse_reason(row) for row in worse if not row["binding"]
    )
    return True, reasons
