"""Retrieval metrics from ranked ids: recall@k, MRR@k, and the scores a match threshold is set from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KS = (1, 5, 10)


@dataclass
class Outcome:
    """One query in one mode: where the first correct product ranked, and the two scores that matter."""

    rank: int | None  # 1-based rank of the first expected product in the top-k, None if absent
    true_score: float | None  # modality cosine of the first expected product, when retrieved
    best_other: float | None  # modality cosine of the best-ranked product that is not expected


@dataclass
class Tally:
    """Outcomes of one table row (set, group, mode, filter)."""

    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, outcome: Outcome, seconds: float) -> None:
        self.outcomes.append(outcome)
        self.seconds += seconds

    def recall(self, k: int) -> float:
        return float(np.mean([o.rank is not None and o.rank <= k for o in self.outcomes])) if self.outcomes else 0.0

    def mrr(self) -> float:
        return float(np.mean([1.0 / o.rank if o.rank else 0.0 for o in self.outcomes])) if self.outcomes else 0.0

    def curve(self, max_k: int) -> list[float]:
        return [self.recall(k) for k in range(1, max_k + 1)]

    def summary(self) -> dict[str, float]:
        n = len(self.outcomes)
        return {
            "queries": n,
            **{f"R@{k}": round(self.recall(k), 4) for k in KS},
            "MRR": round(self.mrr(), 4),
            "top5_error": round(1 - self.recall(5), 4),
            "seconds": round(self.seconds, 2),
            "queries_per_s": round(n / self.seconds, 1) if self.seconds else 0.0,
        }
