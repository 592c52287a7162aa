"""The testbed experiment of ``kedit finetune`` and ``benchmarks/finetune_forgetting.py``: phase 1 on the world's
general text, phase 2 on a new domain, then forgetting (old-world recall lost) and phase-2 learning (new-fact
recall gained) of the resulting delta."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .domain import new_domain, old_world_probes, phase1_texts
from .run import FinetuneConfig, FinetuneResult, Progress, finetune, measure_recall

__all__ = ["TestbedData", "run_testbed"]


@dataclass(frozen=True)
class TestbedData:
    """Sizes of the testbed analogue (defaults: what ``kedit finetune`` uses)."""

    phase1_texts: int = 2000
    new_persons: int = 24
    old_probes: int = 600
    domain_seed: int = 1

    def check(self) -> None:
        for k in ("phase1_texts", "new_persons", "old_probes"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


def run_testbed(
    model: Any,
    tok: Any,
    world: Any,
    config: FinetuneConfig,
    data: TestbedData = TestbedData(),
    *,
    baseline: dict[str, float] | None = None,
    progress: Progress | None = None,
) -> tuple[FinetuneResult, dict[str, Any]]:
    """Fine-tune on the testbed analogue and measure; ``baseline`` (``old_recall_before`` / ``new_recall_before``)
    skips re-measuring the unchanged model. The model is left unchanged."""
    data.check()
    domain = new_domain(world, data.new_persons, data.domain_seed)
    old = old_world_probes(world, data.old_probes)
    if baseline is None:
        baseline = {
            "old_recall_before": measure_recall(model, tok, old),
            "new_recall_before": measure_recall(model, tok, domain.probes),
        }
    result = finetune(
        model, tok, phase1_texts(world, data.phase1_texts), domain.sentences, config, progress=progress
    )
    with result.delta.applied(model):
        after_old = measure_recall(model, tok, old)
        after_new = measure_recall(model, tok, domain.probes)
    metrics = {
        **baseline,
        "old_recall_after": after_old,
        "new_recall_after": after_new,
        "forgetting": baseline["old_recall_before"] - after_old,
        "learning": after_new - baseline["new_recall_before"],
        "old_probes": len(old),
        "new_probes": len(domain.probes),
    }
    return result, metrics
