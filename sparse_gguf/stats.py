"""What one forward step read and computed. The strategies (ffn, attention, head) fill it; the model reports it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepStats:
    bytes: float = 0.0       # bytes one decoded token reads: the dense weights, adjusted by what each part skips
    ffn_used: list[float] = field(default_factory=list)   # per layer: fraction of neurons whose down row was used
    attended: list[float] = field(default_factory=list)   # per layer: positions the last query attended to

    def summary(self, decode: bool) -> dict[str, float]:
        """Means over layers (and, for bytes, the decode step's total)."""
        out = {"ffn_active_fraction": float(np.mean(self.ffn_used)), "attended_tokens": float(np.mean(self.attended))}
        if decode:
            out["bytes"] = self.bytes
        return out
