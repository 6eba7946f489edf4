"""The `devicecheck` subcommand: arguments, defaults per device, exit code."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `python -m app devicecheck` on the root parser's subcommands."""
    p = commands.add_parser(
        "devicecheck",
        help="prove the GPU path (CPU: a dry run): bitwise checks, key fields, VAE guard, latency; JSON report",
    )
    p.add_argument("--out", type=Path, default=Path("devicecheck-report.json"), help="the JSON report")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the first NVIDIA GPU nvidia-smi shows, else the CPU (a dry run)")
    p.add_argument("--model", dest="variant", choices=("full", "tiny"), default=None,
                   help="full: SD1.5 size (GPU default); tiny: SD1.5 layout at toy widths (CPU default)")
    p.add_argument("--dtype", choices=("float16", "float32", "bfloat16"), default=None,
                   help="model dtype (GPU default float16, CPU float32)")
    p.add_argument("--size", type=int, default=None, help="image width and height (GPU 512, CPU 64)")
    p.add_argument("--steps", type=int, default=None, help="steps of the latency measurement (GPU 50, CPU 4)")
    p.add_argument("--check-steps", type=int, default=None, help="steps of every bitwise check (GPU 20, CPU 3)")
    p.add_argument("--runs", type=int, default=None, help="interleaved runs per side for the latency ratio")
    p.add_argument("--concurrency", type=int, default=None, help="concurrent requests in the concurrency check")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="stop starting new phases when this is spent; what is left is reported as skipped")
    p.add_argument("--skip", action="append", default=[], metavar="PHASE",
                   help="a phase not to run (repeatable): model is always built; server, n_image, concurrency, "
                        "golden, vae_guard, two_workers, restart, latency")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.set_defaults(func=cmd_devicecheck)


def cmd_devicecheck(args: argparse.Namespace) -> int:
    """Run the device check; exit 0 when every check passed, 1 when one failed, 2 on unusable arguments."""
    from app.pipeline.determinism import prepare_environment

    try:
        from app.devicecheck.probe import pick_device

        device = pick_device(args.device)
    except RuntimeError as exc:
        print(f"sameseed: {exc}", file=sys.stderr)
        return 2
    kind = "cuda" if device.startswith("cuda") else "cpu"
    prepare_environment(device, args.threads)  # before this process imports torch (the direct baseline)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    from app.devicecheck.runner import Options, Run, default_work, profile_defaults, remove_work

    values = profile_defaults(kind, {k: getattr(args, k) for k in
                                     ("variant", "dtype", "size", "steps", "check_steps", "runs", "concurrency")})
    if values["size"] % 8 or values["size"] < 16 or min(values["steps"], values["check_steps"], values["runs"]) < 1:
        print("sameseed: --size must be a multiple of 8 (>= 16); --steps, --check-steps, --runs >= 1", file=sys.stderr)
        return 2
    from app.devicecheck.runner import PHASES

    unknown = sorted(set(args.skip) - set(PHASES[1:]))
    if unknown:
        print(f"sameseed: --skip takes {', '.join(PHASES[1:])}; not {', '.join(unknown)}", file=sys.stderr)
        return 2
    work = args.work or default_work()
    options = Options(device=device, threads=args.threads, budget_s=args.budget_s, work=work.resolve(),
                      out=args.out.resolve(), skip=tuple(args.skip), **values)
    try:
        report = Run(options).execute()
    finally:
        if args.work is None:
            remove_work(work)
    print(report.table())
    print(f"report: {options.out}")
    return 0 if report.passed else 1
