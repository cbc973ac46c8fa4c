"""The numbers evaluation reports and their intervals, exactly as docs/evaluation.md defines them.

ROUGE-L F1 between a generated and a teacher thought; the normalised action compared for action agreement; Wilson
intervals for rates; percentile-bootstrap intervals for means; paired differences of two agents on the same tasks.
Pure Python and numpy: nothing here knows about engines or Ray.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_THOUGHT_LABEL = re.compile(r"^\s*(?:thought|think|reasoning)(?:[ \t]*\d+)?[ \t]*:\s*", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_Z95 = 1.959963984540054


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words: the units ROUGE-L counts (punctuation and spacing do not matter)."""
    return _WORD.findall(text.lower())


def strip_thought_label(text: str) -> str:
    """`Thought 2: go to the desk` -> `go to the desk` (the label is the format's, not the reasoning)."""
    return _THOUGHT_LABEL.sub("", text, count=1).strip()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over `words`: 2PR / (P + R) with P = LCS/|candidate|, R = LCS/|reference|.
    Two empty texts match (1.0); one empty text against a non-empty one scores 0.0."""
    c, r = words(candidate), words(reference)
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def normalise_action(action: str | None) -> str:
    """The form actions are compared in: lower case, runs of whitespace as one space (also inside brackets), no
    space just inside brackets, no trailing period, no surrounding quotes or backticks. None (no parseable
    action) becomes "", which never equals a real action."""
    if action is None:
        return ""
    text = _SPACE.sub(" ", action.strip().strip("`'\"").strip().lower())
    text = re.sub(r"\[\s+", "[", re.sub(r"\s+\]", "]", text))
    return text.rstrip(".").rstrip()


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided interval (NaN bounds where it cannot be estimated)."""

    value: float
    low: float
    high: float

    def show(self, percent: bool = False, digits: int = 2) -> str:
        if math.isnan(self.value):
            return "n/a"
        if percent:
            return f"{100 * self.value:.0f}% [{100 * self.low:.0f}, {100 * self.high:.0f}]"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


NAN = Interval(math.nan, math.nan, math.nan)


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of a rate (valid at 0/n and n/n, unlike the normal approximation)."""
    if n <= 0:
        return NAN
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> Interval:
    """The mean with a percentile-bootstrap interval (resampling the values with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return NAN
    if x.size == 1:
        return Interval(float(x[0]), float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return Interval(float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> Interval:
    """mean(a - b) over paired items (the same tasks played by two agents), bootstrap interval over the pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same items: {len(a)} vs {len(b)}")
    return bootstrap_mean(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), confidence,
                          resamples, seed)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation), NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else math.nan


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if abs(confidence - 0.95) < 1e-12:
        return _Z95
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)
