"""Command line: serve, models list, models build."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError


def _settings(**overrides: object):  # noqa: ANN202 - returns Settings; imported lazily
    from app.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()]
        print("sameseed: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the HTTP server with its worker processes."""
    from app.logs import configure_logging
    from app.main import create_app
    from app.registry import RegistryError
    from app.server import run

    settings = _settings(host=args.host, port=args.port)
    configure_logging(settings.log_level)
    try:
        application = create_app(settings)
    except (RegistryError, ValueError, RuntimeError) as exc:
        print(f"sameseed: cannot start: {exc}", file=sys.stderr)
        return 2
    run(application, host=settings.host, port=settings.port, drain_s=settings.drain_s)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """Print the registered models."""
    from app.registry import load_registry

    settings = _settings()
    registry = load_registry(settings.models)
    for entry in registry.models:
        folder = registry.local_folder(entry, settings.data_dir)
        where = entry.source.hub.repo if entry.source.hub else str(folder)
        mark = "*" if entry.id == (settings.default_model or registry.default_model) else " "
        print(f"{mark} {entry.id:20} {entry.family:5} {entry.dtype:9} {entry.source.kind:6} {where}")
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    """Build a builtin random-weight model deterministically and print its file hashes."""
    from app.models.build import MODEL_SPECS, build_model, file_sha256s

    if args.model not in MODEL_SPECS:
        print(f"sameseed: no builder for {args.model!r}; known: {', '.join(MODEL_SPECS)}", file=sys.stderr)
        return 2
    out = args.out or (_settings().data_dir / "models" / args.model)
    build_model(args.model, out)
    for rel, digest in file_sha256s(out).items():
        print(f"{digest}  {rel}")
    print(f"built {args.model} into {out}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure overhead vs plain diffusers, 1 vs 2 workers, and time to ready; print a table."""
    from app.bench import run_bench

    run_bench(runs=args.runs, images=args.images, ready_runs=args.ready_runs, out=args.out)
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m app`."""
    root = argparse.ArgumentParser(prog="python -m app", description="Sameseed deterministic image service")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server (settings: SAMESEED_* env vars)")
    serve.add_argument("--host", default=None, help="bind address (SAMESEED_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (SAMESEED_PORT, default 8000)")
    serve.set_defaults(func=cmd_serve)

    models = commands.add_parser("models", help="list or build models").add_subparsers(dest="action", required=True)
    listing = models.add_parser("list", help="list the registered models")
    listing.set_defaults(func=cmd_models_list)
    build = models.add_parser("build", help="build a builtin random-weight model (sameseed-tiny, sameseed-bench)")
    build.add_argument("model")
    build.add_argument("--out", type=Path, default=None, help="folder (default: <data dir>/models/<model>)")
    build.set_defaults(func=cmd_models_build)

    bench = commands.add_parser("bench", help="measure this machine: overhead, worker scaling, time to ready")
    bench.add_argument("--runs", type=int, default=9, help="interleaved runs per side for the overhead ratio")
    bench.add_argument("--images", type=int, default=12, help="images per throughput measurement")
    bench.add_argument("--ready-runs", type=int, default=3, help="server starts timed")
    bench.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    bench.set_defaults(func=cmd_bench)
    return root


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = parser().parse_args(argv)
    return int(args.func(args))
