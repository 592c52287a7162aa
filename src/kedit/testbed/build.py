"""Build a testbed: world → tokenizer → GPT-2 and Llama models → gates → ``manifest.json``.

Layout of a build directory::

    world.json            the world (stable JSON, see :meth:`World.to_json`)
    gpt2/ llama/          Hugging Face checkpoints (config, safetensors weights, tokenizer files)
    manifest.json         generator version, seed, sha256 of every file, gate figures, timings, parameter counts

``manifest.json`` is written last. A directory with build files but no manifest is an interrupted build
(:func:`incomplete_build`): :func:`kedit.testbed.load_testbed_model` refuses it, and building into it again starts
over (the build's own files -- ``world.json``, ``gpt2/``, ``llama/`` -- are removed first, nothing else).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .world import (
    World,
    WorldConfig,
    alias_pairs,
    generate_world,
    register_pairs,
    trained_pairs,
    training_sentences,
    two_hop_pairs,
)

__all__ = [
    "ARCHS",
    "DEFAULT_SEED",
    "GENERATOR_VERSION",
    "build_micro_testbed",
    "build_testbed",
    "build_testbed_parallel",
    "incomplete_build",
    "merge_builds",
    "file_hashes",
    "training_facts",
    "verify_manifest",
]

logger = logging.getLogger(__name__)

# Bump whenever the world generator, tokenizer, trainer recipe or model shapes change (the committed assets must
# then be rebuilt: `kedit testbed build`).
GENERATOR_VERSION = "1.2.0"
DEFAULT_SEED = 0
ARCHS = ("gpt2", "llama")
VOCAB_SIZE = {False: 1024, True: 512}


def _train_configs(micro: bool, seed: int) -> dict[str, Any]:
    from .train import TrainConfig

    if micro:
        base = TrainConfig(
            epochs=30, batch_size=8, lr=6e-3, warmup_frac=0.06, filler_per_epoch=30, pack_len=128, seed=seed
        )
        return {"gpt2": replace(base, lr=4e-3), "llama": base}
    base = TrainConfig(epochs=20, batch_size=16, lr=3e-3, filler_per_epoch=600, pack_len=128, seed=seed)
    # GPT-2 (learned positions) is unstable at high lr on packed sequences
    return {"gpt2": replace(base, lr=2e-3), "llama": base}


def training_facts(world: World) -> list[tuple[str, str]]:
    """The ``(prompt, object)`` training pairs: trained (subject, template) pairs, alias sentences, company
    register lines (:func:`~kedit.testbed.world.register_pairs`), the trained two-hop split and the alias
    introductions ("X is also known as Dr. Y")."""
    facts = [(t.format(s), o) for _, s, t, o in trained_pairs(world) + alias_pairs(world) + register_pairs(world)]
    facts += [(t.format(s), o) for _, s, t, o in two_hop_pairs(world, trained=True)]
    for person in sorted(world.aliases):
        for alias in world.aliases[person]:
            facts.append((f"{person} is also known as", alias))
    return facts


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: str | Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except ``manifest.json`` (POSIX relative paths, sorted)."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


#: what a build writes before its manifest (an interrupted build leaves some of these and no manifest)
_BUILD_ENTRIES = ("world.json", *ARCHS)


def incomplete_build(root: str | Path) -> bool:
    """Whether ``root`` holds an interrupted build: some of its files (world, a model directory) but no
    ``manifest.json``."""
    root = Path(root)
    return (
        root.is_dir()
        and not (root / "manifest.json").is_file()
        and any((root / name).exists() for name in _BUILD_ENTRIES)
    )


def _clear_incomplete(root: Path) -> None:
    import shutil

    if not incomplete_build(root):
        return
    logger.warning("%s holds an interrupted build (no manifest.json); starting it over", root)
    for name in _BUILD_ENTRIES:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def verify_manifest(root: str | Path) -> list[str]:
    """Problems found comparing ``root/manifest.json`` with the files and the generator version (empty = ok)."""
    root = Path(root)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        return [f"no manifest at {mpath}"]
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    problems = []
    if manifest.get("generator_version") != GENERATOR_VERSION:
        problems.append(
            f"generator_version {manifest.get('generator_version')!r} != {GENERATOR_VERSION!r}: rebuild the testbed"
        )
    actual = file_hashes(root)
    for rel, digest in manifest.get("files", {}).items():
        if rel not in actual:
            problems.append(f"missing file {rel}")
        elif actual[rel] != digest:
            problems.append(f"hash mismatch for {rel}")
    for rel in actual:
        if rel not in manifest.get("files", {}):
            problems.append(f"file not in manifest: {rel}")
    return problems


def build_testbed(
    out_dir: str | Path,
    *,
    micro: bool = False,
    seed: int = DEFAULT_SEED,
    progress: Callable[[int, int], None] | None = None,
    archs: Sequence[str] = ARCHS,
    epochs: int | None = None,
    world_config: WorldConfig | None = None,
    width: int | None = None,
) -> dict[str, Any]:
    """Build the testbed into ``out_dir`` and return its manifest (also written to ``out_dir/manifest.json``).

    ``progress(step, total)`` reports optimiser steps over all models. ``epochs`` overrides the recipe (for
    quick experiments; the manifest records it). ``width`` trains the models at another residual width (the MLP
    scaled with it, see :func:`kedit.testbed.train.widened`): same world, recipe and seeds; the manifest records
    it. Deterministic on CPU for the same arguments and library versions.
    """
    import torch
    import transformers

    from .gates import GATE_TARGETS, MICRO_GATE_TARGETS, evaluate_gates, weights_digest
    from .tokenizer import train_tokenizer
    from .train import (
        DEFAULT_SPECS,
        MICRO_SPECS,
        build_model,
        encode_examples,
        plan_steps,
        train_model,
        widened,
    )

    base_specs = MICRO_SPECS if micro else DEFAULT_SPECS
    for arch in archs:
        if arch not in base_specs:
            raise ValueError(f"unknown testbed architecture {arch!r}; expected one of {sorted(base_specs)}")
    specs = {arch: widened(base_specs[arch], width) for arch in archs}  # bad widths refused before any write
    t_start = time.time()
    out = Path(out_dir)
    _clear_incomplete(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    cfg = world_config or (WorldConfig.micro() if micro else WorldConfig())
    world = generate_world(seed, cfg, generator_version=GENERATOR_VERSION)
    (out / "world.json").write_text(world.to_json(), encoding="utf-8")
    timings["world"] = round(time.time() - t_start, 2)

    t0 = time.time()
    text = training_sentences(world)
    tokenizer = train_tokenizer(text["facts"] + text["two_hop"] + text["filler"], VOCAB_SIZE[micro])
    timings["tokenizer"] = round(time.time() - t0, 2)

    train_cfgs = _train_configs(micro, seed)
    models: dict[str, Any] = {}
    plans: dict[str, Any] = {}
    for arch in archs:
        tcfg = train_cfgs[arch]
        if epochs is not None:
            tcfg = replace(tcfg, epochs=epochs)
        facts_ex, plain_ex = encode_examples(
            tokenizer, training_facts(world), world.filler, tcfg.prompt_loss_weight
        )
        plans[arch] = (tcfg, facts_ex, plain_ex, plan_steps(facts_ex, plain_ex, tcfg))
    grand_total = sum(p[3] for p in plans.values())
    done = 0
    for arch in archs:
        t0 = time.time()
        tcfg, facts_ex, plain_ex, n_steps = plans[arch]
        model = build_model(
            specs[arch],
            len(tokenizer),
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            seed + 1000 * ARCHS.index(arch),  # same weights whether built alone or with the other arch
        )

        def _progress(step: int, total: int, _offset: int = done) -> None:
            if progress is not None:
                progress(_offset + step, grand_total)

        log = train_model(model, facts_ex, plain_ex, tcfg, pad_id=tokenizer.pad_token_id, progress=_progress)
        done += n_steps
        timings[f"train_{arch}"] = round(time.time() - t0, 2)
        t0 = time.time()
        old = torch.get_num_threads()
        torch.set_num_threads(tcfg.num_threads)
        try:
            gates = evaluate_gates(model, tokenizer, world, targets=MICRO_GATE_TARGETS if micro else None)
        finally:
            torch.set_num_threads(old)
        timings[f"gates_{arch}"] = round(time.time() - t0, 2)
        logger.info("%s gates: %s", arch, gates)
        mdir = out / arch
        model.save_pretrained(mdir, safe_serialization=True)
        tokenizer.save_pretrained(mdir)
        models[arch] = {
            "params": int(sum(p.numel() for p in model.parameters())),
            "spec": asdict(specs[arch]),
            "train": tcfg.to_dict(),
            "steps": log["steps"],
            "final_epoch_loss": round(log["epoch_loss"][-1], 4),
            "weights_sha256": weights_digest(model),
            "gates": gates,
        }

    timings["total"] = round(time.time() - t_start, 2)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "micro": micro,
        "world_hash": world.world_hash,
        "world_stats": {
            "entities": {k: len(v) for k, v in sorted(world.entities.items())},
            "facts": sum(len(v) for v in world.facts.values()),
            "trained_pairs": len(trained_pairs(world)),
            "vocab_size": len(tokenizer),
        },
        "models": models,
        "gate_targets": MICRO_GATE_TARGETS if micro else GATE_TARGETS,
        "build_seconds": timings,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "files": file_hashes(out),
        "passed": all(m["gates"]["passed"] for m in models.values()),
    }
    if width is not None:  # only a width-series build records it (the default manifest keeps its keys)
        manifest["width"] = width
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    logger.info("testbed built in %.1fs at %s (passed=%s)", timings["total"], out, manifest["passed"])
    return manifest


def build_micro_testbed(out_dir: str | Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Build the micro testbed into ``out_dir`` unless a matching build (same generator version, seed, micro,
    intact files) is already there; returns ``out_dir``."""
    out = Path(out_dir)
    mpath = out / "manifest.json"
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except ValueError:
            manifest = {}
        if manifest.get("micro") is True and manifest.get("seed") == seed and not verify_manifest(out):
            return out
    build_testbed(out, micro=True, seed=seed)
    return out


def merge_builds(parts: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Merge single-architecture builds (``build_testbed(dir, archs=(arch,))``, same seed / micro / version) into
    one build directory ``out_dir`` and return its manifest. The files are those a sequential build writes (the
    world and tokenizer are deterministic and each model's seed depends only on its architecture)."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifests = [json.loads((Path(p) / "manifest.json").read_text(encoding="utf-8")) for p in parts]
    first = manifests[0]
    for m in manifests[1:]:
        for key in ("generator_version", "seed", "micro", "width", "world_hash", "versions"):
            if m.get(key) != first.get(key):
                raise ValueError(f"cannot merge builds that differ in {key}: {m.get(key)!r} != {first.get(key)!r}")
    shutil.copyfile(Path(parts[0]) / "world.json", out / "world.json")
    models: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for p, m in zip(parts, manifests):
        for arch, info in m["models"].items():
            if arch in models:
                raise ValueError(f"architecture {arch!r} is in more than one part")
            if (out / arch).exists():
                shutil.rmtree(out / arch)
            shutil.copytree(Path(p) / arch, out / arch)
            models[arch] = info
        for k, v in m["build_seconds"].items():
            if k != "total":
                timings[k] = max(v, timings.get(k, 0.0))
    timings["total"] = max(m["build_seconds"]["total"] for m in manifests)  # the parts ran concurrently
    manifest = dict(first)
    manifest.update(
        models={a: models[a] for a in sorted(models)},
        build_seconds=timings,
        parallel_parts=len(manifests),
        files=file_hashes(out),
        passed=all(m["gates"]["passed"] for m in models.values()),
    )
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    return manifest


def _part_main(argv: Sequence[str]) -> None:
    """Entry point of one :func:`build_testbed_parallel` child: ``out arch micro(0/1) seed epochs|- world|-
    width|-`` (``world``: the :class:`WorldConfig` fields as JSON)."""
    out, arch, micro, seed, epochs, world, width = argv
    build_testbed(
        out,
        archs=(arch,),
        micro=micro == "1",
        seed=int(seed),
        epochs=None if epochs == "-" else int(epochs),
        world_config=None if world == "-" else WorldConfig(**json.loads(world)),
        width=None if width == "-" else int(width),
    )


def _stderr_tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def build_testbed_parallel(
    out_dir: str | Path,
    *,
    micro: bool = False,
    seed: int = DEFAULT_SEED,
    archs: Sequence[str] = ARCHS,
    epochs: int | None = None,
    world_config: WorldConfig | None = None,
    width: int | None = None,
    poll_seconds: float = 0.5,
) -> dict[str, Any]:
    """:func:`build_testbed` with one process per architecture (each trains on one thread), merged with
    :func:`merge_builds`; the files are identical to a sequential build. Returns the manifest. ``kedit testbed
    build`` uses it when at least two cores are usable.

    The children run the same kedit as the caller (its package directory goes first on their ``PYTHONPATH``). If
    one fails, the others are stopped and a :class:`RuntimeError` names the architecture, its exit code and the end
    of its error output; nothing is written to ``out_dir`` but the (emptied) directory itself. An interrupted
    build in ``out_dir`` is started over, as with :func:`build_testbed`.
    """
    import os
    import subprocess
    import sys
    import tempfile

    from .train import DEFAULT_SPECS, MICRO_SPECS, widened

    archs = tuple(archs)
    specs = MICRO_SPECS if micro else DEFAULT_SPECS
    unknown = [a for a in archs if a not in specs]
    if unknown or not archs or len(set(archs)) != len(archs):
        raise ValueError(
            f"archs must be distinct testbed architectures from {sorted(specs)}, got {list(archs)}"
        )
    for arch in archs:
        widened(specs[arch], width)  # a bad width is refused before any process starts
    out = Path(out_dir)
    _clear_incomplete(out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the directory holding this kedit package
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    extra = [
        "-" if epochs is None else str(int(epochs)),
        "-" if world_config is None else json.dumps(asdict(world_config)),
        "-" if width is None else str(int(width)),
    ]
    code = "import sys; from kedit.testbed.build import _part_main; _part_main(sys.argv[1:])"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-parts-") as tmp:
        parts = [Path(tmp) / arch for arch in archs]
        logs = [Path(tmp) / f"{arch}.stderr" for arch in archs]
        procs: list[subprocess.Popen] = []
        try:
            for p, arch, log_path in zip(parts, archs, logs):
                with log_path.open("wb") as err:
                    argv = [str(p), arch, "1" if micro else "0", str(seed), *extra]
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-c", code, *argv], stderr=err, stdin=subprocess.DEVNULL, env=env
                        )
                    )
            while True:
                codes = [pr.poll() for pr in procs]
                if any(c not in (None, 0) for c in codes) or all(c == 0 for c in codes):
                    break
                time.sleep(poll_seconds)
        finally:
            for pr in procs:  # a failed sibling, an exception or Ctrl-C here: stop what still runs
                if pr.poll() is None:
                    pr.terminate()
            for pr in procs:
                try:
                    pr.wait(timeout=30)
                except subprocess.TimeoutExpired:  # pragma: no cover - a child ignoring SIGTERM
                    pr.kill()
                    pr.wait()
        failed = [(a, c, lp) for a, c, lp in zip(archs, codes, logs) if c not in (None, 0)]
        if failed:
            report = "; ".join(
                f"{a} exited with {c}" + (f":\n{_stderr_tail(lp)}" if _stderr_tail(lp) else "")
                for a, c, lp in failed
            )
            raise RuntimeError(f"parallel testbed build into {out} failed: {report}")
        manifest = merge_builds(parts, out)
    return manifest
