"""Helpers shared by every ``kedit`` command (:mod:`kedit.cli`, :mod:`kedit.eval.cli`).

They live here, not in :mod:`kedit.cli`, so that the command modules import them without importing each other
(the eval commands are registered on the main app when :mod:`kedit.cli` is imported, however it is imported).

Everything that can be checked without the model -- the method name, ``--set`` keys, counts, whether a model name
can be loaded at all -- is checked by these helpers *before* the model is loaded, in the same way on every command.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

__all__ = [
    "check_model_available",
    "cell",
    "edit_context",
    "err",
    "fail",
    "load_or_fail",
    "method_name",
    "out",
    "parse_sets",
    "progress_bars",
    "resolve_requests",
    "validate_method",
]

err = Console(stderr=True)
out = Console()

_TRUE = ("1", "on", "yes", "true")


def cell(value: Any) -> Text:
    """A table cell showing ``value`` literally (user text is never read as Rich markup: ``E[o*]`` stays)."""
    return Text("" if value is None else str(value))


def fail(message: str) -> None:
    """Print ``error: message`` on stderr (literally, no markup) and exit with status 2."""
    err.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Any]:
    """A ``fn(stage, done, total)`` drawing one Rich bar per stage on stderr."""
    if not enabled:
        yield None
        return
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = prog.add_task(escape(stage), total=total)
        prog.update(tasks[stage], completed=done, total=total)

    with prog:
        yield update


# -- checks before the expensive work ----------------------------------------------------------------------------
def method_name(method: str, strategy: str | None) -> str:
    if strategy in (None, "", "spread", "default"):
        return method
    return f"{method}-{strategy}"


def parse_sets(sets: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            fail(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            cfg[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            cfg[k.strip()] = v
    return cfg


def validate_method(name: str, sets: Mapping[str, Any]) -> Any:
    """The :class:`~kedit.methods.registry.MethodSpec` of ``name``; an unknown method or an unknown ``--set`` key
    fails here, before any model is loaded. (Values are checked again against the model's preset later.)"""
    from kedit.methods.registry import ConfigError, UnknownMethodError, get_method

    try:
        spec = get_method(name)
        spec.make_config(dict(sets))
    except (UnknownMethodError, ConfigError) as e:
        fail(str(e))
    except (TypeError, ValueError) as e:
        fail(f"--set: {e}")
    return spec


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id, ...
        return False
    return isinstance(found, str)


def check_model_available(model: str) -> dict[str, Any]:
    """Fail fast (seconds, not a minute of retries) when ``model`` cannot be loaded: a missing local path, or a hub
    id that is neither in the local Hugging Face cache nor downloadable (offline mode, or the hub unreachable).

    Returns extra ``from_pretrained`` keyword arguments: ``local_files_only=True`` when the model is cached and the
    hub is offline or unreachable (no retries)."""
    from kedit.api import TESTBED_MODELS

    if model in TESTBED_MODELS or Path(model).expanduser().is_dir():
        return {}
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith("/"):
        fail(f"model {model!r}: no such directory")
    cached = _in_hf_cache(model)
    if _hub_offline():
        if not cached:
            fail(f"model {model!r} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1); "
                 "download it once while online, or pass a local directory")
        return {"local_files_only": True}
    if not _hub_reachable():
        if not cached:
            fail(f"model {model!r} is not in the local Hugging Face cache and the hub "
                 f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) cannot be reached; "
                 "check the network, or pass a local directory")
        return {"local_files_only": True}
    return {}


def load_or_fail(model: str, **kwargs: Any) -> tuple[Any, Any]:
    from transformers.utils import logging as hf_logging

    from kedit.api import load_model

    hf_logging.disable_progress_bar()  # the CLI shows its own status line; no "Loading weights" bar
    try:
        with err.status(f"loading {escape(model)}"):
            return load_model(model, **kwargs)
    except OSError as e:
        fail(f"cannot load model {model!r}: {e}")
        raise


def edit_context(stats_dir: Path | None, no_cache: bool, **kw: Any) -> Any:
    """The :class:`~kedit.core.context.EditContext` of a command: statistics in ``--stats-dir`` if given, in memory
    only with ``--no-cache``, else in the persistent default cache (:func:`kedit.core.stats.default_cache_dir`)."""
    from kedit.core.context import EditContext

    if stats_dir is not None:
        return EditContext.with_cache_dir(stats_dir, **kw)
    if no_cache:
        return EditContext(**kw)
    return EditContext.with_default_cache(**kw)


# -- requests --------------------------------------------------------------------------------------------------------
def resolve_requests(
    spec: str, limit: int | None = None, fmt: str | None = None, *, distinct: bool = False, whole: bool = False
) -> list[Any]:
    """``testbed``, ``testbed:N`` (the first N), ``testbed:A-B`` (requests A..B-1, e.g. a held-out slice) -- the
    testbed's counterfactual requests -- or a dataset file in any supported format.

    With ``distinct``, only the first request of each subject is kept (:func:`kedit.data.distinct_subjects`,
    the mass-editing protocol of MEMIT), and ``limit`` counts the kept ones. With ``whole``, every request of as
    few subjects as give ``limit`` requests, interleaved (:func:`kedit.data.whole_subjects`: long streams that leave
    the other subjects untouched).
    """
    if distinct and whole:
        fail("--distinct-subjects and --whole-subjects exclude each other")
    if limit is not None and limit < 1:
        fail(f"--limit must be at least 1, got {limit}")
    if spec == "testbed" or spec.startswith("testbed:"):
        from kedit.testbed import edit_requests, load_world

        start, stop = _testbed_slice(spec)
        reqs = edit_requests(load_world(), n=stop)
        reqs = reqs[start:stop]
    else:
        from kedit.data import DataFormatError, load_requests

        path = Path(spec)
        if not path.exists():
            fail(f"requests file {spec!r} not found (or use testbed[:N] / testbed:A-B)")
        try:
            reqs = load_requests(path, format=fmt, limit=None if distinct or whole else limit)
        except (DataFormatError, ValueError) as e:
            fail(str(e))
    if distinct:
        from kedit.data import distinct_subjects

        try:
            reqs = distinct_subjects(reqs, limit=limit)
        except ValueError as e:
            fail(str(e))
    elif whole:
        from kedit.data import whole_subjects

        try:
            reqs = whole_subjects(reqs, limit=limit)
        except ValueError as e:
            fail(str(e))
    elif limit is not None:
        reqs = reqs[:limit]
    if not reqs:
        fail(f"no requests in {spec!r}")
    return reqs


def _testbed_slice(spec: str) -> tuple[int, int | None]:
    arg = spec.split(":", 1)[1] if ":" in spec else ""
    try:
        if not arg:
            return 0, None
        if "-" in arg:
            a, b = (int(x) for x in arg.split("-", 1))
        else:
            a, b = 0, int(arg)
    except ValueError:
        fail(f"bad testbed spec {spec!r}: use testbed, testbed:N or testbed:A-B")
    if a < 0 or b <= a:
        fail(f"bad testbed spec {spec!r}: need 0 <= A < B")
    return a, b
