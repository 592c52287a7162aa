"""Evaluation: a metric registry with exact definitions, versioned protocols, a batched resumable runner, reports.

    from kedit.eval import EvalConfig, run_eval
    run = run_eval(model, tok, requests, "rome", config=EvalConfig(protocol="single/v1"), out_dir="runs/rome")

See ``docs/eval.md``. ``kedit eval`` / ``kedit report`` are the command-line front ends.
"""

from kedit.eval.metrics import (
    METRICS,
    MetricDef,
    get_metric,
    list_metrics,
    metric_definitions,
    register_metric,
)
from kedit.eval.protocols import PROTOCOLS, Protocol, get_protocol, list_protocols
from kedit.eval.runner import EvalConfig, EvalRun, RunMismatchError, load_run, run_eval, summarize

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
