"""``kedit finetune`` (registered on the main Typer app by :func:`register`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune_cmd(
        model: str = typer.Option(
            ..., "--model", help="testbed-gpt2, testbed-llama or a testbed build's model dir."
        ),
        regularize: str = typer.Option(
            "si",
            "--regularize",
            help="si (Synaptic Intelligence, layer-wise coefficients), ewc (EWC-LoRA: full-space Fisher of the adapted weights), ewc-ab (a Fisher per LoRA factor) or none.",
        ),
        out_dir: Path = typer.Option(
            ..., "--out", help="Directory for the delta and finetune.json (new or empty)."
        ),
        sets: list[str] = typer.Option(
            [],
            "--set",
            help="Config override key=value (JSON values), repeatable: "
            "weight, layer_coeff, phase2_epochs, lora_rank, ...",
        ),
        phase1_texts: int = typer.Option(2000, "--phase1-texts", help="General-text sentences of phase 1."),
        new_persons: int = typer.Option(24, "--new-persons", help="New persons of the phase-2 domain."),
        old_probes: int = typer.Option(600, "--old-probes", help="Old-world facts measured for forgetting."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Two-phase forgetting-aware LoRA fine-tuning on the testbed analogue (phase 1: the world's general text,
        phase 2: facts about new persons); saves the change as a kedit delta (revertible bitwise) and reports
        forgetting (old-world recall lost) and phase-2 learning (new-fact recall)."""
        from kedit.api import TESTBED_MODELS
        from kedit.cli_common import check_model_available, fail, load_or_fail, out, parse_sets, progress_bars
        from kedit.finetune.experiment import TestbedData, run_testbed
        from kedit.finetune.run import FinetuneConfig
        from kedit.testbed import load_world
        from kedit.testbed.world import World

        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            fail(f"--out {out_dir} exists and is not an empty directory")
        try:
            overrides = parse_sets(sets)
            overrides["regularize"] = regularize
            cfg = FinetuneConfig().replace(**overrides).resolved()
            data = TestbedData(phase1_texts, new_persons, old_probes)
            data.check()
        except (ValueError, TypeError) as e:
            fail(str(e))
            raise
        if model in TESTBED_MODELS:
            world = load_world()
        elif (Path(model).parent / "world.json").is_file():
            world = World.from_json((Path(model).parent / "world.json").read_text(encoding="utf-8"))
        else:
            fail(
                f"{model!r} is not a testbed model: kedit finetune's data is the testbed analogue (general text "
                "of the world, then new facts), so --model must be testbed-gpt2, testbed-llama or the model "
                "directory of a testbed build (next to its world.json)"
            )
            raise AssertionError  # unreachable: fail() exits
        m, tok = load_or_fail(model, **check_model_available(model))
        try:
            with progress_bars(not json_out) as bar:
                result, metrics = run_testbed(
                    m, tok, world, cfg, data, progress=(lambda s, d, t: bar(s, d, t)) if bar else None
                )
        except (ValueError, RuntimeError) as e:
            fail(f"finetune/{cfg.regularize}: {e}")
            raise
        tmp = out_dir.with_name(out_dir.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        result.delta.save(tmp / "delta")
        record = {
            "model": model,
            "regularize": cfg.regularize,
            "config": cfg.to_dict(),
            "data": {"phase1_texts": phase1_texts, "new_persons": new_persons, "old_probes": old_probes},
            "train": {k: v for k, v in result.log.items() if k != "config"},
            "metrics": metrics,
            "delta": str(out_dir / "delta"),
        }
        (tmp / "finetune.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
        if json_out:
            sys.stdout.write(json.dumps(record) + "\n")
            return
        log = result.log
        imp = log.get("importance")
        out.print(
            f"finetune/{cfg.regularize} on {model}: phase 1 {log['phase1']['steps']} steps, phase 2 "
            f"{log['phase2']['steps']} steps, {log['seconds']:.0f}s; delta in {out_dir}/delta"
        )
        if imp:
            out.print(
                f"  importance ({imp['kind']}): {imp['seconds']:.3f}s, stored state {imp['state_bytes']:,} bytes"
            )
        out.print(
            f"  old-world recall {metrics['old_recall_before']:.3f} -> {metrics['old_recall_after']:.3f} "
            f"(forgetting {metrics['forgetting']:.3f})"
        )
        out.print(
            f"  new-fact recall  {metrics['new_recall_before']:.3f} -> {metrics['new_recall_after']:.3f} "
            f"(learning {metrics['learning']:.3f})"
        )
