"""``build_testbed_parallel`` (one process per architecture, merged) and interrupted builds (a directory with build
files but no manifest: refused by the loaders, started over by a build).

The real builds here use a nano world and one epoch (a few seconds of training per model): they test the
orchestration and the file identity with a sequential build, not the model quality (the micro build does)."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

import kedit
from kedit.testbed import load_testbed_model, load_world
from kedit.testbed.build import (
    build_testbed,
    build_testbed_parallel,
    file_hashes,
    incomplete_build,
    verify_manifest,
)
from kedit.testing import nano_world_config

NANO = nano_world_config()


def _partial_build(root: Path) -> None:
    """What an interrupted build leaves (a world, a model directory with a stale file), next to a user file."""
    (root / "gpt2").mkdir(parents=True)
    (root / "gpt2" / "stale.bin").write_bytes(b"half a checkpoint")
    (root / "world.json").write_text("{}", encoding="utf-8")
    (root / "notes.txt").write_text("mine", encoding="utf-8")


@pytest.fixture(scope="module")
def parallel_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel") / "tb"
    _partial_build(root)
    assert incomplete_build(root)
    manifest = build_testbed_parallel(root, micro=True, epochs=1, world_config=NANO, poll_seconds=0.1)
    return root, manifest


def test_parallel_build_merges_both_models_and_clears_the_partial_build(parallel_build):
    root, manifest = parallel_build
    assert json.loads((root / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert verify_manifest(root) == [] and not incomplete_build(root)
    assert set(manifest["models"]) == {"gpt2", "llama"} and manifest["parallel_parts"] == 2
    assert manifest["micro"] is True and manifest["world_stats"]["entities"]["person"] == NANO.n_persons
    assert all(info["train"]["epochs"] == 1 for info in manifest["models"].values())
    # the interrupted build's files are gone, the user's file is kept, no part directory is left behind
    assert not (root / "gpt2" / "stale.bin").exists()
    assert (root / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert [p.name for p in root.parent.iterdir()] == ["tb"]
    world = load_world(root)
    assert world.world_hash == manifest["world_hash"]
    for arch in ("gpt2", "llama"):
        model, tok = load_testbed_model(arch, assets_dir=root)
        assert (
            tok.bos_token_id is not None and model.config.vocab_size == manifest["world_stats"]["vocab_size"]
        )


def test_interrupted_build_is_refused_then_started_over(tmp_path, monkeypatch, parallel_build):
    """A build stopped after the world was written leaves no manifest: the loaders refuse the directory, and
    building again starts over; the result's files equal those of the parallel build (same seed)."""
    import kedit.testbed.train as train

    root = tmp_path / "seq"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_testbed(root, micro=True, epochs=1, world_config=NANO, archs=("llama",))
    assert (root / "world.json").is_file() and not (root / "manifest.json").exists()
    assert incomplete_build(root)
    with pytest.raises(FileNotFoundError, match="interrupted testbed build"):
        load_world(root)
    with pytest.raises(FileNotFoundError, match="interrupted testbed build"):
        load_testbed_model("llama", assets_dir=root)
    (root / "gpt2").mkdir()  # a model directory this build does not make is an interrupted build's file, too
    monkeypatch.undo()

    manifest = build_testbed(root, micro=True, epochs=1, world_config=NANO, archs=("llama",))
    assert verify_manifest(root) == [] and not (root / "gpt2").exists()
    par_root, par = parallel_build
    par_files = file_hashes(par_root)
    assert manifest["files"] == {
        k: v for k, v in par_files.items() if k == "world.json" or k.startswith("llama/")
    }
    assert manifest["models"]["llama"]["weights_sha256"] == par["models"]["llama"]["weights_sha256"]
    # a complete build whose manifest is lost is interrupted, too
    (root / "manifest.json").unlink()
    assert incomplete_build(root)
    with pytest.raises(FileNotFoundError, match="interrupted testbed build"):
        load_testbed_model("llama", assets_dir=root)


def test_incomplete_build_needs_build_files(tmp_path):
    assert not incomplete_build(tmp_path / "missing") and not incomplete_build(tmp_path)
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    assert not incomplete_build(tmp_path)  # a directory of other files is no build at all
    (tmp_path / "llama").mkdir()
    assert incomplete_build(tmp_path)
    (tmp_path / "manifest.json").write_text("{}", encoding="utf-8")
    assert not incomplete_build(tmp_path)


def _fake_python(tmp_path: Path) -> Path:
    """An 'interpreter' for the children: the gpt2 child prints its PYTHONPATH and an error and exits 3, the llama
    child would run for a minute."""
    script = tmp_path / "fake-python"
    script.write_text(
        "#!/bin/sh\n"
        "# argv: -c CODE OUT ARCH MICRO SEED EPOCHS WORLD\n"
        'if [ "$4" = gpt2 ]; then\n'
        '  echo "PYTHONPATH=$PYTHONPATH" >&2\n'
        '  echo "ValueError: boom in $4" >&2\n'
        "  exit 3\n"
        "fi\n"
        "exec sleep 60\n",
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.skipif(sys.platform == "win32", reason="the fake child interpreter is a POSIX shell script")
def test_parallel_build_surfaces_a_child_error_and_stops_the_others(tmp_path, monkeypatch):
    out = tmp_path / "tb"
    _partial_build(out)
    monkeypatch.setattr(sys, "executable", str(_fake_python(tmp_path)))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="gpt2 exited with 3") as info:
        build_testbed_parallel(out, micro=True, poll_seconds=0.05)
    assert time.monotonic() - t0 < 30  # the llama child was stopped, not waited for
    msg = str(info.value)
    assert "ValueError: boom in gpt2" in msg and "llama exited" not in msg
    # the children import the caller's kedit first
    src = str(Path(kedit.__file__).resolve().parents[1])
    line = next(x for x in msg.splitlines() if x.startswith("PYTHONPATH="))
    assert line.removeprefix("PYTHONPATH=").split(os.pathsep)[0] == src
    # the partial build was cleared before starting; nothing half-merged is left, no part directory either
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not incomplete_build(out) and sorted(p.name for p in tmp_path.iterdir()) == ["fake-python", "tb"]


def test_parallel_build_rejects_bad_archs_before_starting(tmp_path, monkeypatch):
    import subprocess

    def no_child(*a, **k):
        raise AssertionError("no child process may start")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    for archs in (("gpt2", "bert"), (), ("llama", "llama")):
        with pytest.raises(ValueError, match="archs must be distinct"):
            build_testbed_parallel(tmp_path / "tb", micro=True, archs=archs)
    assert not (tmp_path / "tb").exists()
