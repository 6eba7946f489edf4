"""The `sameseed` command line: client commands over HTTP or on files, and the server's own commands.

Client commands (generate, health, golden run, baselines, verify, compare) need only `pip install .`;
serve, models and bench need `pip install '.[server]'`.
"""

from __future__ import annotations

import argparse
import base64
import json
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
    from app.models.registry import RegistryError
    from app.telemetry.logs import configure_logging
    from app.telemetry.tracing import configure_tracing
    from app.worker.plan import prepare
    from app.worker.pool import WorkerPool

    settings = _settings(host=args.host, port=args.port, ray_address=getattr(args, "ray", None))
    configure_logging(settings.log_level)
    configure_tracing()  # on only when the standard OTEL_* variables ask for it
    pool: WorkerPool | None = None
    try:
        if settings.ray_address:  # the workers are Ray Serve replicas on the cluster (README "Scale-out on Ray Serve")
            from app.worker.ray_pool import RayPool, ServeBackend, connect, plan_replicas

            devices = plan_replicas(settings.workers, connect(settings.ray_address))
            startup = prepare(settings, devices)
            pool = RayPool(startup.configs, ServeBackend(), start_timeout_s=settings.worker_start_timeout_s).launch()
        else:
            startup = prepare(settings)
            # Workers spawn first: their torch/diffusers import (seconds) overlaps the server's own.
            pool = WorkerPool(startup.configs, start_timeout_s=settings.worker_start_timeout_s).launch()
        from app.cli.serve import connection_limits, run
        from app.main import create_app

        launched = pool
        application = create_app(settings, pool_factory=lambda _configs: launched, startup=startup)
    except (RegistryError, ValueError, RuntimeError, ConnectionError) as exc:
        if pool is not None:
            pool.terminate()
        print(f"sameseed: cannot start: {exc}", file=sys.stderr)
        return 2
    limits = connection_limits(settings)
    run(application, host=settings.host, port=settings.port, drain_s=settings.drain_s, limits=limits)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """Print the registered models."""
    from app.models.registry import load_registry

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


def cmd_models_pull(args: argparse.Namespace) -> int:
    """Make models loadable offline (hub: download, verify, pin; builtin: build; local: check); print hashes."""
    from app.errors import SameseedError
    from app.models.hub import pull
    from app.models.registry import load_registry
    from app.pipeline.loader import resolve_paths, verify_files

    settings = _settings()
    registry = load_registry(settings.models)
    data_dir = settings.data_dir.resolve()
    ids = args.models or [entry.id for entry in registry.models]
    unknown = [model_id for model_id in ids if registry.get(model_id) is None]
    if unknown:
        print(f"sameseed: not in the registry {settings.models}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    failed = 0
    for model_id in ids:
        entry = registry.get(model_id)
        assert entry is not None
        try:
            # 1. Hub files, with progress bars, whatever SAMESEED_ALLOW_DOWNLOAD says: pulling is asked for here.
            pull(entry, data_dir=data_dir, allow_download=True, progress=True)
            # 2. Every file the model loads from, checked as a worker checks it before loading.
            files = verify_files(entry, resolve_paths(entry, registry, data_dir, allow_download=False))
        except SameseedError as exc:
            print(f"sameseed: {exc.message}", file=sys.stderr)
            failed += 1
            continue
        # YAML: paste under the model's `sha256:` in the registry to pin these bytes on every server.
        print(f"{model_id}:")
        for rel, digest in files.items():
            print(f"  {rel}: {digest}")
        print(f"{model_id}: {len(files)} files ready to load offline", file=sys.stderr)
    return 1 if failed else 0


def _remote(args: argparse.Namespace):  # noqa: ANN202 - a SameseedClient
    from app.cli.client import SameseedClient

    return SameseedClient(args.server, api_key=args.api_key)


def cmd_golden_run(args: argparse.Namespace) -> int:
    """Run the golden suite on a server now; write the report; exit 1 when any worker drifted."""
    from app.cli.client import RemoteError

    client = _remote(args)
    try:
        report = client.call("POST", "/v1/consistency/run")
    except RemoteError as exc:
        print(f"sameseed: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    if args.out:
        args.out.write_text(text)
    for worker in report["workers"]:
        print(f"{worker['id']:6} {worker['state']:18} {worker['worker_state']:12} checks={worker['checks_run']}")
    print(f"status: {report['status']}")
    return 1 if report["status"] == "drifted" else 0


def cmd_baselines(args: argparse.Namespace) -> int:
    """Export a server's golden baselines to a file, or import a file into it."""
    from app.cli.client import RemoteError

    client = _remote(args)
    try:
        if args.action == "export":
            document = client.call("GET", "/v1/consistency/baselines")
            args.file.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
            print(f"exported {len(document['baselines'])} baselines to {args.file}")
        else:
            body = json.loads(args.file.read_text())
            result = client.call("PUT", "/v1/consistency/baselines", json=body, params={"replace": args.replace})
            print(f"imported {result['imported']} baselines")
    except (RemoteError, OSError, ValueError) as exc:
        print(f"sameseed: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    """Soak a cpu:2 server; exit 1 when a request was lost or answered 5xx."""
    from app.cli.soak import run_soak

    report = run_soak(
        requests=args.requests, concurrency=args.concurrency, kill_every_s=args.kill_every, out=args.out
    )
    return 0 if report.lost == 0 and report.server_errors == 0 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure overhead vs plain diffusers, 1 vs 2 workers, and time to ready; print a table."""
    from app.cli.bench import LISTENER_ROUNDS, run_bench, run_cobatch_bench, run_listener_bench

    if args.only == "cobatch":
        run_cobatch_bench(rounds=args.rounds or 5, out=args.out)
        return 0
    if args.only == "listeners":
        run_listener_bench(
            rounds=args.rounds or LISTENER_ROUNDS, images=args.images, listeners=args.listeners, out=args.out
        )
        return 0
    run_bench(runs=args.runs, images=args.images, ready_runs=args.ready_runs, listeners=args.listeners, out=args.out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a PNG or manifest JSON against public keys; exit 0 valid, 1 not valid, 2 unusable input."""
    from app.cli.client import RemoteError
    from app.provenance.png import PNG_SIGNATURE
    from app.provenance.signing import key_id, load_public_key, load_public_keys
    from app.provenance.verification import parse_manifest, verify_manifest, verify_png

    if not args.public_key and not args.server:
        print("sameseed: verify needs --public-key or --server", file=sys.stderr)
        return 2
    try:
        keys = {kid: key for source in args.public_key or () for kid, key in load_public_keys(source).items()}
        if args.server:
            with _remote(args) as client:
                served = [load_public_key(entry["public_key"]) for entry in client.public_keys()["keys"]]
            keys.update({key_id(key): key for key in served})
        data = args.file.read_bytes()
        is_png = data.startswith(PNG_SIGNATURE)
        anchors = args.c2pa_trust_anchors.read_bytes() if args.c2pa_trust_anchors is not None else None
        result = verify_png(data, keys, anchors) if is_png else verify_manifest(parse_manifest(data), keys)
    except (OSError, ValueError, KeyError, RemoteError) as exc:
        print(f"sameseed: cannot verify: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2))
    return 0 if result.valid else 1


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate on a server; write each PNG and the response JSON into --out; exit 2 on a refused request."""
    from pydantic import ValidationError

    from app.api.schemas import GenerationRequest
    from app.cli.client import RemoteError

    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "width": args.width,
        "height": args.height,
        "sampler": args.sampler,
        "num_images": args.num_images,
    }
    try:
        request = GenerationRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        with _remote(args) as client:
            response = client.generate(request)
    except ValidationError as exc:
        print(f"sameseed: invalid request: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    except RemoteError as exc:
        print(f"sameseed: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{response.id}.json").write_text(response.model_dump_json(indent=1) + "\n")
    for image in response.images:
        path = args.out / f"{response.id}-{image.index}.png"
        path.write_bytes(base64.b64decode(image.png_base64 or ""))
        print(f"{image.seed} {image.latent_sha256} {image.pixel_sha256} {path}")
    print(f"reproducibility_key: {response.manifest.runtime.reproducibility_key}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Print a server's version and workers; exit 0 ready, 1 alive but not ready, 2 unreachable."""
    from app.cli.client import RemoteError

    try:
        with _remote(args) as client:
            health, ready = client.health(), client.ready()
    except RemoteError as exc:
        print(f"sameseed: {exc}", file=sys.stderr)
        return 2
    print(f"sameseed {health.version}: {'ready' if ready.ready else 'not ready'}, {ready.queue_depth} waiting")
    for worker in ready.workers:
        print(f"{worker.id:6} {worker.state:12} {worker.device:8} consistency={worker.consistency}")
    return 0 if ready.ready else 1


def _server_options(command: argparse.ArgumentParser, required: bool = True) -> None:
    command.add_argument("--server", required=required, help="base URL, e.g. http://gpu-box:8000")
    command.add_argument("--api-key", default=None, help="Bearer key (default: $SAMESEED_API_KEY)")


def parser(prog: str = "python -m app") -> argparse.ArgumentParser:
    """The argument parser of `python -m app` (and of the installed `sameseed` command)."""
    root = argparse.ArgumentParser(prog=prog, description="Sameseed deterministic image service")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server (settings: SAMESEED_* env vars)")
    serve.add_argument("--host", default=None, help="bind address (SAMESEED_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (SAMESEED_PORT, default 8000)")
    serve.add_argument(
        "--ray", default=None, metavar="ADDRESS",
        help="run the workers as Ray Serve replicas on the Ray cluster whose head is ADDRESS (SAMESEED_RAY_ADDRESS)",
    )
    serve.set_defaults(func=cmd_serve)

    models = commands.add_parser("models", help="list, build or pull models")
    models = models.add_subparsers(dest="action", required=True)
    listing = models.add_parser("list", help="list the registered models")
    listing.set_defaults(func=cmd_models_list)
    build = models.add_parser(
        "build", help="build a builtin random-weight model (sameseed-tiny, sameseed-tiny-xl, sameseed-bench)"
    )
    build.add_argument("model")
    build.add_argument("--out", type=Path, default=None, help="folder (default: <data dir>/models/<model>)")
    build.set_defaults(func=cmd_models_build)
    pulling = models.add_parser("pull", help="download hub models (verified, sha256-pinned), build builtins")
    pulling.add_argument("models", nargs="*", metavar="ID", help="registry ids (default: every model)")
    pulling.set_defaults(func=cmd_models_pull)

    golden = commands.add_parser("golden", help="golden-suite checks").add_subparsers(dest="action", required=True)
    golden_run = golden.add_parser("run", help="run the golden suite on a server now and keep the report")
    golden_run.add_argument("--server", required=True, help="base URL, e.g. http://gpu-box:8000")
    golden_run.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    golden_run.add_argument("--api-key", default=None, help="Bearer key (default: $SAMESEED_API_KEY)")
    golden_run.set_defaults(func=cmd_golden_run)

    baselines = commands.add_parser("baselines", help="export/import golden baselines").add_subparsers(
        dest="action", required=True
    )
    for action, helptext in (("export", "write a server's baselines to FILE"), ("import", "load FILE into a server")):
        sub = baselines.add_parser(action, help=helptext)
        sub.add_argument("file", type=Path)
        sub.add_argument("--server", required=True, help="base URL, e.g. http://gpu-box:8000")
        sub.add_argument("--api-key", default=None, help="Bearer key (default: $SAMESEED_API_KEY)")
        if action == "import":
            sub.add_argument("--replace", action="store_true", help="drop the server's baselines first")
        sub.set_defaults(func=cmd_baselines)

    bench = commands.add_parser("bench", help="measure this machine: overhead, worker scaling, time to ready")
    bench.add_argument("--runs", type=int, default=9, help="interleaved runs per side for the overhead ratio")
    bench.add_argument("--images", type=int, default=12, help="images per throughput measurement")
    bench.add_argument("--ready-runs", type=int, default=3, help="server starts timed")
    bench.add_argument("--listeners", type=int, default=200, help="SSE streams open during the listener run")
    bench.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    bench.add_argument("--only", choices=["cobatch", "listeners"], default=None, help="run one measurement alone")
    bench.add_argument(
        "--rounds", type=int, default=None,
        help="with --only: interleaved rounds (of each kind) of that measurement (cobatch: 5, listeners: 8)",
    )
    bench.set_defaults(func=cmd_bench)

    soak = commands.add_parser("soak", help="mixed requests against cpu:2 with worker kills: lost, 5xx, p99, RSS")
    soak.add_argument("--requests", type=int, default=3000)
    soak.add_argument("--concurrency", type=int, default=16)
    soak.add_argument("--kill-every", type=float, default=60.0, help="seconds between worker SIGKILLs")
    soak.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    soak.set_defaults(func=cmd_soak)

    verify = commands.add_parser("verify", help="verify a PNG or manifest JSON offline (signature, pixels, C2PA)")
    verify.add_argument("file", type=Path, help="a PNG the service wrote, or a manifest JSON file")
    verify.add_argument(
        "--public-key",
        action="append",
        help="a public key PEM file, a saved GET /v1/keys JSON, or base64 of the raw key; repeatable",
    )
    _server_options(verify, required=False)
    verify.add_argument(
        "--c2pa-trust-anchors",
        type=Path,
        default=None,
        help="CA certificates (PEM) under which a PNG's C2PA signer counts as trusted",
    )
    verify.set_defaults(func=cmd_verify)

    generate = commands.add_parser("generate", help="generate on a server; save the PNGs and the response")
    _server_options(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--model", default=None, help="registry id (default: the server's default model)")
    generate.add_argument("--seed", type=int, default=None, help="default: the server draws one")
    generate.add_argument("--steps", type=int, default=None)
    generate.add_argument("--guidance-scale", type=float, default=None)
    generate.add_argument("--width", type=int, default=None)
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--sampler", default=None, help="e.g. euler_a, dpmpp_2m (GET /v1/samplers)")
    generate.add_argument("--num-images", type=int, default=None)
    generate.add_argument("--out", type=Path, default=Path("."), help="folder for <id>-<k>.png and <id>.json")
    generate.set_defaults(func=cmd_generate)

    health = commands.add_parser("health", help="a server's version, readiness and workers")
    _server_options(health)
    health.set_defaults(func=cmd_health)

    compare = commands.add_parser("compare", help="compare generations across machines: key fields, hashes, drift")
    compare.add_argument("files", nargs="+", type=Path, help="2+ manifest JSON, /v1/generations response or PNG files")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")
    compare.set_defaults(func=cmd_compare)

    from app.devicecheck.command import add_parser as add_devicecheck

    add_devicecheck(commands)
    return root


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare generations; exit 0 all hashes agree, 1 they differ, 2 unusable input."""
    from app.provenance.comparison import run_compare

    return run_compare(args.files, as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    installed = Path(sys.argv[0]).name == "sameseed"  # the console script, rather than `python -m app`
    args = (parser("sameseed") if installed else parser()).parse_args(argv)
    try:
        return int(args.func(args))
    except ModuleNotFoundError as exc:  # a client-only install running a server command
        print(
            f"sameseed: {args.command} needs the server's dependencies ({exc.name} is missing): "
            "pip install 'sameseed[server]'",
            file=sys.stderr,
        )
        return 2
