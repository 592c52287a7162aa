"""The kedit testbed: a deterministic synthetic knowledge world and two tiny models (GPT-2, Llama) that know it.

Public API (imports are lazy; importing this package does not import torch or transformers)::

    from kedit.testbed import load_testbed_model, load_world, edit_requests, corpus
    model, tok = load_testbed_model("gpt2")          # or "llama"
    world = load_world()
    requests = edit_requests(world, n=50, seed=0)    # list[kedit.requests.EditRequest]
    texts = corpus(world, n=2000)                     # filler + fact sentences, e.g. for covariance statistics

See ``docs/testbed.md`` for the world, the training recipe and the gate figures.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..requests import EditRequest
    from .world import World

__all__ = [
    "ARCHS",
    "GENERATOR_VERSION",
    "assets_dir",
    "build_micro_testbed",
    "build_testbed",
    "corpus",
    "edit_requests",
    "generate_world",
    "load_testbed_model",
    "load_world",
]

GENERATOR_VERSION = "1.2.0"  # kept equal to build.GENERATOR_VERSION (checked by the tests)
ARCHS = ("gpt2", "llama")


def assets_dir(name: str = "default") -> Path:
    """Directory of a committed testbed build (package data)."""
    return Path(__file__).resolve().parent / "assets" / name


def _resolve(name_or_dir: str | Path | None) -> Path:
    if name_or_dir is None:
        return assets_dir("default")
    p = Path(name_or_dir)
    if p.is_dir():
        return p
    if isinstance(name_or_dir, str) and "/" not in name_or_dir and "\\" not in name_or_dir:
        return assets_dir(name_or_dir)
    raise FileNotFoundError(f"no testbed at {name_or_dir!s}")


def _refuse_incomplete(root: Path) -> None:
    from .build import incomplete_build

    if incomplete_build(root):
        raise FileNotFoundError(
            f"{root} is an interrupted testbed build (no manifest.json, which a build writes last); rebuild it "
            f"(`kedit testbed build --out {root}` starts it over)"
        )


def load_world(name: str | Path = "default") -> World:
    """Load the world of a committed testbed (``name``) or of a build directory (a path)."""
    from .world import World

    root = _resolve(name)
    _refuse_incomplete(root)
    path = root / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"no world.json in {root}; build one with kedit.testbed.build_testbed()")
    return World.from_json(path.read_text(encoding="utf-8"))


def load_testbed_model(
    arch: str = "gpt2", *, assets_dir: str | Path | None = None, dtype: Any = None, device: Any = None
) -> tuple[Any, Any]:
    """Load a testbed model and its tokenizer with ``from_pretrained``; the model is in eval mode.

    Args:
        arch: ``"gpt2"`` or ``"llama"``.
        assets_dir: a build directory (default: the committed ``default`` testbed).
        dtype: torch dtype (or its name, ``"float16"``) to load in (default: as stored, float32).
        device: where to put the model (default: CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown testbed architecture {arch!r}; expected one of {ARCHS}")
    root = _resolve(assets_dir)
    _refuse_incomplete(root)
    path = root / arch
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no {arch} checkpoint in {root}; build one with kedit.testbed.build_testbed()"
        )
    if isinstance(dtype, str):
        import torch

        dtype = getattr(torch, dtype.removeprefix("torch."))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    # The testbed's pad, bos and eos are one token (GPT-2's convention). A config declaring that id as the pad token
    # makes transformers guess "padded input without a mask" whenever it drops an all-ones mask in generate() and a
    # finished row is fed that id, and warn on every evaluation. kedit pads with the tokenizer's id and always passes
    # the attention mask, so the loaded config declares no pad token, like GPT-2's and Llama's own configs.
    model.config.pad_token_id = None
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = None
    if device is not None:
        model = model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ValueError:
        # the assets were saved by transformers 5 (tokenizer class "TokenizersBackend"); 4.x reads the same
        # tokenizer.json as a PreTrainedTokenizerFast (without token_type_ids, which GPT-2 would embed)
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, model_input_names=["input_ids", "attention_mask"])
    return model, tokenizer


def edit_requests(
    world: World | None = None, n: int | None = None, seed: int = 0, **kwargs: Any
) -> list[EditRequest]:
    """Counterfactual edit requests over ``world`` (default: the committed world); see
    :func:`kedit.testbed.edits.edit_requests`."""
    from .edits import edit_requests as _edit_requests

    return _edit_requests(world if world is not None else load_world(), n=n, seed=seed, **kwargs)


def corpus(world: World | None = None, n: int | None = None) -> list[str]:
    """Filler and (trained) fact sentences of ``world``, deterministically shuffled; the first ``n`` if given."""
    from .world import training_sentences

    w = world if world is not None else load_world()
    text = training_sentences(w)
    items = text["filler"] + text["facts"] + text["two_hop"]
    random.Random(w.seed).shuffle(items)
    return items if n is None else items[:n]


def build_testbed(
    out_dir: str | Path, *, micro: bool = False, seed: int = 0, progress: Any = None, **kw: Any
) -> dict:
    """Generate world, tokenizer, models and gates into ``out_dir``; see :func:`kedit.testbed.build.build_testbed`."""
    from .build import build_testbed as _build

    return _build(out_dir, micro=micro, seed=seed, progress=progress, **kw)


def build_micro_testbed(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build (or reuse) the micro testbed in ``out_dir``; see :func:`kedit.testbed.build.build_micro_testbed`."""
    from .build import build_micro_testbed as _build_micro

    return _build_micro(out_dir, seed=seed)


def generate_world(seed: int = 0, config: Any = None) -> World:
    """Generate a world (``config``: :class:`kedit.testbed.world.WorldConfig`; ``None`` = default sizes)."""
    from .build import GENERATOR_VERSION as _gv
    from .world import generate_world as _gen

    return _gen(seed, config, generator_version=_gv)


def corpus_for_model(model: Any) -> tuple[list[str], str] | None:
    """The statistics corpus of a testbed model, found from its checkpoint directory.

    A testbed build lays models out as ``<build>/<arch>/`` next to ``<build>/world.json``; for a model loaded from
    such a directory this returns ``(corpus(world), "testbed:<world hash>")``, otherwise ``None``.
    """
    from .world import World

    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not path:
        return None
    world_file = Path(path).parent / "world.json"
    if not (Path(path).is_dir() and world_file.is_file()):
        return None
    world = World.from_json(world_file.read_text(encoding="utf-8"))
    return corpus(world), f"testbed:{world.world_hash}"
