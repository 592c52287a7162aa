"""Retain models: the testbed model retrained by the same recipe without the forget persons.

TOFU's forget quality compares the unlearned model with a model that never saw the forget set (Maini et al.,
2024). For a testbed split this is the testbed recipe (:func:`kedit.testbed.build._train_configs`, the same
initialisation seed, tokenizer, filler and schedule) on the training facts minus every one that names a forgotten
person (its name or alias, in the prompt or as the object: person facts, alias lines, two-hop lines, founder
register lines). Cost: the recipe is 20 epochs; on one CPU thread the default GPT-2 trains in about 19 minutes
(``build_seconds`` of the testbed manifest), the forget10 retain model (90 % of the persons) in a little less.

Where they live: a committed one under ``kedit/unlearn/assets/retain/<split>-<arch>`` (stored in float16 to fit
the package-data size budget, loaded as float32), else the kedit cache ``<cache>/unlearn/retain/...`` where
``kedit unlearn-retain`` (or :func:`build_retain_model`) writes it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = [
    "build_retain_model",
    "load_retain_model",
    "retain_model_dir",
    "retain_training_facts",
]

logger = logging.getLogger(__name__)


def _committed_dir(split: str, arch: str) -> Path:
    # next to this module, not inside the testbed build (whose manifest lists every file of its directory)
    return Path(__file__).resolve().parent / "assets" / "retain" / f"{split}-{arch}"


def _cache_dir(split: str, arch: str) -> Path:
    from kedit.core.stats import default_cache_dir

    return default_cache_dir() / "unlearn" / "retain" / f"{split}-{arch}"


def retain_model_dir(split: str, arch: str) -> Path | None:
    """The directory of a finished retain model for ``split`` / ``arch`` (committed first, then the cache), or
    ``None``."""
    for d in (_committed_dir(split, arch), _cache_dir(split, arch)):
        if (d / "retain.json").is_file() and (d / "config.json").is_file():
            return d
    return None


def retain_training_facts(world: Any, persons: list[str]) -> tuple[list[tuple[str, str]], int]:
    """The testbed training pairs without those that name one of ``persons``; also how many were dropped."""
    from kedit.testbed.build import training_facts

    from .splits import mentions

    names = mentions(world, persons)
    kept, dropped = [], 0
    for prompt, obj in training_facts(world):
        if any(n in prompt or n in obj for n in names):
            dropped += 1
        else:
            kept.append((prompt, obj))
    return kept, dropped


def build_retain_model(
    split: str,
    arch: str = "gpt2",
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    epochs: int | None = None,
    save_dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Train the retain model of testbed ``split`` (e.g. ``"forget10"``) for ``arch`` and save it.

    Written to a temporary sibling and renamed when complete, so an interrupted build leaves nothing behind.
    ``epochs`` overrides the recipe (tests); the record ``retain.json`` keeps the persons, counts and timing.
    """
    import torch

    from kedit.testbed import load_testbed_model, load_world
    from kedit.testbed.build import _train_configs
    from kedit.testbed.train import DEFAULT_SPECS, build_model, encode_examples, train_model

    from .splits import forget_persons

    if arch not in DEFAULT_SPECS:
        raise ValueError(f"unknown testbed architecture {arch!r}; expected one of {sorted(DEFAULT_SPECS)}")
    world = load_world()
    persons = forget_persons(world, split, seed)
    out = Path(out_dir) if out_dir is not None else _cache_dir(split, arch)
    _, tokenizer = load_testbed_model(arch)
    facts, dropped = retain_training_facts(world, persons)
    tcfg = _train_configs(False, seed)[arch]
    if epochs is not None:
        tcfg = replace(tcfg, epochs=epochs)
    facts_ex, plain_ex = encode_examples(tokenizer, facts, world.filler, tcfg.prompt_loss_weight)
    arch_index = ("gpt2", "llama").index(arch)
    model = build_model(
        DEFAULT_SPECS[arch],
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        seed + 1000 * arch_index,
    )
    t0 = time.time()
    log = train_model(model, facts_ex, plain_ex, tcfg, pad_id=tokenizer.pad_token_id, progress=progress)
    seconds = time.time() - t0
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.to(getattr(torch, save_dtype)).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {
        "split": split,
        "arch": arch,
        "seed": seed,
        "forget_persons": persons,
        "training_pairs": len(facts),
        "dropped_pairs": dropped,
        "steps": log["steps"],
        "final_epoch_loss": round(log["epoch_loss"][-1], 4),
        "train_seconds": round(seconds, 1),
        "train": tcfg.to_dict(),
        "saved_dtype": save_dtype,
        "torch": torch.__version__,
    }
    (tmp / "retain.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    logger.info("retain model %s/%s trained in %.0fs -> %s", split, arch, seconds, out)
    return out


def load_retain_model(split: str, arch: str = "gpt2", *, device: Any = None) -> tuple[Any, Any]:
    """Load the retain model of testbed ``split`` / ``arch`` (float32, eval mode) and its tokenizer.

    Raises ``FileNotFoundError`` naming the build command when there is none.
    """
    import torch

    from kedit.testbed import load_testbed_model

    d = retain_model_dir(split, arch)
    if d is None:
        raise FileNotFoundError(
            f"no retain model for testbed:{split} / {arch}; build it with `kedit unlearn-retain --split "
            f"{split} --arch {arch}` (about 20 minutes on one CPU core), it goes to {_cache_dir(split, arch)}"
        )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.config.pad_token_id = None  # as kedit.testbed.load_testbed_model does
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = None
    if device is not None:
        model = model.to(device)
    model.eval()
    _, tok = load_testbed_model(arch)  # the retain model is trained with the testbed tokenizer
    return model, tok
