"""``kedit serve`` (registered on the main Typer app by :func:`register`; imports the service lazily, so the CLI
works without the ``service`` extra until this command is run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Option("testbed-gpt2", "--model", "-m", help="testbed-gpt2, testbed-llama, or an HF name/path."),
        method: str = typer.Option("grace", "--method", help="The editing method of every edit (see `kedit methods`)."),
        sets: list[str] = typer.Option([], "--set", help="Method config override key=value (JSON values), repeatable."),
        state_dir: Path = typer.Option(Path("kedit-service"), "--dir",
                                       help="Where the database (by default), the artefacts and the token file go."),
        db: Optional[str] = typer.Option(None, "--db", help="Database URL (default: sqlite:///<dir>/kedit.db; "
                                         "postgresql://user@host/db works too)."),
        token_file: Optional[Path] = typer.Option(None, "--token-file",
                                                  help="Where the bootstrap admin token is written on first start "
                                                       "(mode 0600; default <dir>/admin-token)."),
        kg: str = typer.Option("testbed", "--kg", help="Seed of an empty KG: testbed, none, or a directory with "
                               "OneEdit's kg.csv and relationship_library.json."),
        n_templates: int = typer.Option(2, "--templates-per-triple", min=1,
                                        help="Edit requests per triple (the first templates of its relation)."),
        allow: list[str] = typer.Option([], "--allow-relation", help="Only these relations may be edited (repeatable)."),
        max_per_day: Optional[int] = typer.Option(None, "--max-edits-per-day", min=0,
                                                  help="Per-user limit (admins are exempt)."),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port", min=1, max=65535),
    ) -> None:
        """Serve the model with the knowledge service: REST API, ledger, KG, web UI at http://HOST:PORT/."""
        from kedit.cli_common import check_model_available, fail, parse_sets, validate_method

        try:
            import uvicorn

            from kedit.service.app import ServiceSettings, create_app
            from kedit.service.policy import RulePolicy
        except ImportError as e:
            fail(f"kedit serve needs the service extra ({e.name} is missing): pip install 'kedit[service]'")
        config = parse_sets(sets)
        validate_method(method, config)
        load_kwargs = check_model_available(model)
        if kg not in ("testbed", "none") and not (Path(kg) / "kg.csv").is_file():
            fail(f"--kg {kg}: expected testbed, none, or a directory with kg.csv and relationship_library.json")
        settings = ServiceSettings(
            db_url=db or f"sqlite:///{state_dir / 'kedit.db'}", artefacts=str(state_dir / "artefacts"),
            token_file=str(token_file or state_dir / "admin-token"), model=model, method=method,
            config=config, kg=kg, n_templates=n_templates,
            policy=RulePolicy(allowed_relations=allow or None, max_edits_per_day=max_per_day),
        )
        from kedit.api import load_model

        app = create_app(settings, model_loader=lambda name: load_model(name, **load_kwargs))
        uvicorn.run(app, host=host, port=port, log_level="info")
