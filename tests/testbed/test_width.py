"""The width option of the testbed build (the width series of docs/lifelong.md): the models are trained at the
requested residual width with the MLP scaled with it, on the same world and tokenizer; bad widths are refused
before anything is written, and builds of different widths do not merge.

The builds use the nano world and one epoch (seconds per model), as in test_parallel_build.py."""

from __future__ import annotations

import pytest

from kedit.testbed import load_testbed_model, load_world
from kedit.testbed.build import (
    build_testbed,
    build_testbed_parallel,
    file_hashes,
    merge_builds,
    verify_manifest,
)
from kedit.testbed.train import DEFAULT_SPECS, MICRO_SPECS, widened
from kedit.testing import nano_world_config

NANO = nano_world_config()


def test_widened_scales_the_mlp_with_the_width():
    for specs in (DEFAULT_SPECS, MICRO_SPECS):
        for spec in specs.values():
            assert widened(spec, None) is spec and widened(spec, spec.d_model) is spec
            wide = widened(spec, 2 * spec.d_model)
            assert (wide.d_model, wide.d_mlp) == (2 * spec.d_model, 2 * spec.d_mlp)
            assert (wide.n_layers, wide.n_heads, wide.arch) == (spec.n_layers, spec.n_heads, spec.arch)
    assert widened(DEFAULT_SPECS["llama"], 640).d_mlp == 1728  # 432 * 4
    for bad in (0, -160, 162, 6, 2.5, True):  # not a multiple of 4 heads, odd head size, not an int
        with pytest.raises(ValueError, match="width"):
            widened(DEFAULT_SPECS["gpt2"], bad)


def test_width_is_honoured_by_the_parallel_build_and_keeps_the_world(tmp_path):
    root = tmp_path / "w32"
    manifest = build_testbed_parallel(root, micro=True, epochs=1, world_config=NANO, width=32, poll_seconds=0.1)
    assert verify_manifest(root) == [] and manifest["width"] == 32
    plain = tmp_path / "plain"
    plain_manifest = build_testbed(plain, micro=True, epochs=1, world_config=NANO, archs=("llama",))
    assert "width" not in plain_manifest
    # the same world and tokenizer as the build at the recipe's width
    assert load_world(root).world_hash == load_world(plain).world_hash == manifest["world_hash"]
    wide_files, plain_files = file_hashes(root), file_hashes(plain)
    assert wide_files["world.json"] == plain_files["world.json"]
    tok_files = [k for k in plain_files if k.startswith("llama/") and "token" in k]
    assert tok_files and all(wide_files[k] == plain_files[k] for k in tok_files)
    for arch, (d, mlp) in {"gpt2": (32, 128), "llama": (32, 88)}.items():
        model, _ = load_testbed_model(arch, assets_dir=root)
        cfg = model.config
        width = cfg.n_embd if arch == "gpt2" else cfg.hidden_size
        inner = cfg.n_inner if arch == "gpt2" else cfg.intermediate_size
        assert (width, inner) == (d, mlp)
        assert model.get_input_embeddings().weight.shape[1] == d
        assert manifest["models"][arch]["spec"]["d_model"] == d and manifest["models"][arch]["spec"]["d_mlp"] == mlp
    small, _ = load_testbed_model("llama", assets_dir=plain)
    assert small.config.hidden_size == MICRO_SPECS["llama"].d_model
    # a part at another width does not merge into this build
    with pytest.raises(ValueError, match="width"):
        merge_builds([plain, _gpt2_part(tmp_path)], tmp_path / "merged")


def _gpt2_part(tmp_path):
    part = tmp_path / "gpt2-w32"
    build_testbed(part, micro=True, epochs=1, world_config=NANO, archs=("gpt2",), width=32)
    return part


def test_bad_width_writes_nothing(tmp_path):
    for build in (build_testbed, build_testbed_parallel):
        root = tmp_path / build.__name__
        with pytest.raises(ValueError, match="width"):
            build(root, micro=True, epochs=1, world_config=NANO, width=30)  # head size 7.5
        assert not root.exists()


def test_cli_refuses_a_bad_width_or_arch_before_building(tmp_path):
    from typer.testing import CliRunner

    from kedit.cli import app

    runner = CliRunner()
    for args, message in ((["--width", "322"], "--width"), (["--arch", "bert"], "--arch")):
        out = tmp_path / "tb"
        r = runner.invoke(app, ["testbed", "build", "--micro", "--sequential", "--out", str(out), *args])
        assert r.exit_code == 2 and message in r.output
        assert not out.exists()
