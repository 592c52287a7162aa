"""Evaluation: a metric registry with exact definitions, versioned protocols, a batched resumable runner, reports.

    from kedit.eval import EvalConfig, run_eval
    run = run_eval(model, tok, requests, "rome", config=EvalConfig(protocol="single/v1"), out_dir="runs/rome")

See ``docs/eval.md``. ``kedit eval`` / ``kedit report`` are the command-line front ends.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# imported lazily (PEP 562), so that `kedit.eval.cli` -- registered on the command line at import -- does not pull
# in torch for `kedit --help`
_WHERE = {
    **dict.fromkeys(("METRICS", "MetricDef", "get_metric", "list_metrics", "metric_definitions", "register_metric"),
                    "kedit.eval.metrics"),
    **dict.fromkeys(("PROTOCOLS", "Protocol", "get_protocol", "list_protocols"), "kedit.eval.protocols"),
    **dict.fromkeys(("EvalConfig", "EvalRun", "RunMismatchError", "load_run", "run_eval", "summarize"),
                    "kedit.eval.runner"),
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'kedit.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "METRICS",
    "PROTOCOLS",
    "EvalConfig",
    "EvalRun",
    "MetricDef",
    "Protocol",
    "RunMismatchError",
    "get_metric",
    "get_protocol",
    "list_metrics",
    "list_protocols",
    "load_run",
    "metric_definitions",
    "register_metric",
    "run_eval",
    "summarize",
]
