"""Erasure metrics shared by every evaluation.

ACC_e  - how often the erased (target) concept still appears for target prompts (lower is better);
ACC_p  - how often other prompts are still generated correctly (higher is better);
H      - harmonic mean of (1 - ACC_e) and ACC_p, as in MACE/Co-Erasing-style reporting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


def harmonic(acc_e: float, acc_p: float) -> float:
    """H = 2 (1 - ACC_e) ACC_p / ((1 - ACC_e) + ACC_p); 0 when both terms are 0."""
    if not (0.0 <= acc_e <= 1.0 and 0.0 <= acc_p <= 1.0):
        raise ValueError(f"accuracies must be fractions in [0, 1], got ACC_e={acc_e}, ACC_p={acc_p}")
    erased = 1.0 - acc_e
    return 0.0 if erased + acc_p == 0 else 2 * erased * acc_p / (erased + acc_p)


@dataclass
class PromptScore:
    prompt: str
    kind: str  # "target": counts toward ACC_e; "other": counts toward ACC_p
    n: int
    hits: int  # target: samples still showing the target; other: samples generated correctly

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else 0.0


def erasure_scores(scores: list[PromptScore]) -> dict:
    """Average per-prompt rates into ACC_e, ACC_p and H (each prompt weighs the same)."""
    targets = [s.rate for s in scores if s.kind == "target"]
    others = [s.rate for s in scores if s.kind == "other"]
    if not targets or not others:
        raise ValueError("need at least one target prompt and one other prompt to score an erasure")
    acc_e = sum(targets) / len(targets)
    acc_p = sum(others) / len(others)
    return {"acc_e": acc_e, "acc_p": acc_p, "h": harmonic(acc_e, acc_p),
            "per_prompt": [{**asdict(s), "rate": s.rate} for s in scores]}
