"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not np.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")


class Sampler:
    """Chooses the next token from logits, the order of filters as llama.cpp's default chain:
    repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    @property
    def greedy(self) -> bool:
        """The choice is the argmax of the logits as they come (no temperature, no penalty)."""
        return self.p.temperature <= 0.0 and self.p.repeat_penalty == 1.0

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        p = self.p
        logits = np.asarray(logits, dtype=np.float32)
        if p.repeat_penalty != 1.0 and history:
            logits = logits.copy()
            recent = np.unique(np.asarray(history[-p.repeat_last_n :] if p.repeat_last_n else history))
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature <= 0.0:
            return int(np.argmax(logits))
        # candidates sorted by logit, highest first
        k = p.top_k if 0 < p.top_k < logits.shape[0] else logits.shape[0]
        if k < logits.shape[0]:
            idx = np.argpartition(-logits, k - 1)[:k]
        else:
            idx = np.arange(logits.shape[0])
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        z = logits[idx].astype(np.float64)
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, z, probs = idx[:cut], z[:cut], probs[:cut]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            idx, z = idx[keep], z[keep]
        z = z / p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return int(idx[self.rng.choice(len(idx), p=probs)])
