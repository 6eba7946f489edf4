"""The devicecheck run: build the model, prove the promises through the real service, measure, report.

Every check goes through the service's own code: the worker pool and worker processes
(`app.worker`), the HTTP server (`python -m app serve` via `app.cli.server_process`), the pipeline's
`render_image` and `decode_latents`. Phases run in order of importance and each first asks the
budget; what the budget cannot pay for is reported as skipped, and the JSON report is rewritten
after every phase so a run cut short still leaves what it found.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from app.devicecheck.report import Check, Measure, Report
from app.devicecheck.workload import MODEL_ID, NEGATIVE

PHASES = ("model", "server", "n_image", "concurrency", "golden", "vae_guard", "two_workers", "restart", "latency")
# What 512x512 50-step SD1.5 costs on an H100 with real weights, for reading the service's figure.
ANCHORS = "; H100 anchors with real weights: 0.75 s TensorRT, 1.44 s PyTorch 2 compile, FLOP floor about 0.105 s"


@dataclass(frozen=True)
class Options:
    """What one run does; `profile_defaults` fills what the command line leaves out."""

    device: str  # "cpu" or "cuda:<index>"
    variant: str  # "full" (SD1.5 size) or "tiny" (SD1.5 layout at toy widths)
    dtype: str
    size: int
    steps: int  # the latency measurement (512x512 50-step PNDM on a GPU)
    check_steps: int  # every bitwise check
    runs: int  # interleaved runs per side for the latency ratio
    concurrency: int
    threads: int
    budget_s: float
    work: Path
    out: Path
    skip: tuple[str, ...] = ()  # phases not to run (reported as skipped)

    @property
    def kind(self) -> str:
        """`cuda` or `cpu`."""
        return "cuda" if self.device.startswith("cuda") else "cpu"


PROFILES: dict[str, dict[str, Any]] = {
    # A GPU with the full-size model (by estimate 3-4 minutes on an H100; the goal is 8).
    "cuda": {"variant": "full", "dtype": "float16", "size": 512, "steps": 50, "check_steps": 20, "runs": 3,
             "concurrency": 4},
    # The CPU dry run: same code, toy widths, so the test suite keeps it working in seconds.
    "cpu": {"variant": "tiny", "dtype": "float32", "size": 64, "steps": 4, "check_steps": 3, "runs": 2,
            "concurrency": 3},
}


def profile_defaults(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The profile of `kind` with every value the user gave (not None) on top."""
    return {**PROFILES[kind], **{k: v for k, v in given.items() if v is not None}}


class Budget:
    """Seconds left of the whole run."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadline = clock() + total_s

    def remaining(self) -> float:
        """Seconds until the deadline (negative once past it)."""
        return self.deadline - self.clock()


class Run:
    """One devicecheck run; `execute` does every phase and returns the report."""

    def __init__(self, options: Options, budget: Budget | None = None) -> None:
        self.o = options
        self.budget = budget or Budget(options.budget_s)
        self.report = Report(params={**asdict(options), "work": str(options.work), "out": str(options.out)})
        self.seconds_per_image = 1.0 if options.kind == "cuda" else 0.5  # refined as images come back
        self.model_dir = options.work / "model"
        self.registry = options.work / "registry.yaml"
        self.server: Any = None
        self.singles: dict[int, dict[str, str]] = {}  # seed -> hashes of a single-image request

    # ------------------------------------------------------------------ plumbing

    def _save(self) -> None:
        self.report.finished = time.time()
        self.report.write(self.o.out)

    def phase(self, name: str, images: float, checks: tuple[str, ...], body: Callable[[], None],
              *, needs_server: bool = False) -> None:
        """Run `body` if not skipped and the budget allows about `images` more images; record its time.

        Checks the phase owns but did not record become errors when it raised, skipped when it did not run.
        """
        need = images * self.seconds_per_image
        reason = None
        if name in self.o.skip:
            reason = f"--skip {name}"
        elif needs_server and self.server is None:
            reason = "the server did not start"
        elif self.budget.remaining() < need:
            self.report.budget_exhausted = True
            reason = f"budget: {self.budget.remaining():.0f}s left, phase {name} needs about {need:.0f}s"
        if reason is not None:
            for check in checks:
                self.report.add_check(Check(check, "skipped", reason))
            self._save()
            return
        started = time.monotonic()
        try:
            body()
        except Exception as exc:  # a phase that breaks fails its checks; later phases still run
            detail = f"phase {name} raised {type(exc).__name__}: {exc}"
            for check in checks:
                if not any(c.name == check for c in self.report.checks):
                    self.report.add_check(Check(check, "error", detail, {"traceback": traceback.format_exc()[-4000:]}))
        finally:
            self.report.phases[name] = round(time.monotonic() - started, 3)
            self._save()

    def request(self, **body: Any) -> dict[str, Any]:
        """POST /v1/generations on the server; the response JSON (raises on an error status)."""
        fields = {"model": MODEL_ID, "steps": self.o.check_steps, "width": self.o.size, "height": self.o.size,
                  "sampler": "pndm", "negative_prompt": NEGATIVE, **body}
        started = time.monotonic()
        response = self.server.post(**fields)
        if response.status_code != 200:
            raise RuntimeError(f"generation answered {response.status_code}: {response.text[:500]}")
        answer = response.json()
        self.seconds_per_image = max(0.05, (time.monotonic() - started) / len(answer["images"]))
        return answer

    @staticmethod
    def hashes(answer: dict[str, Any]) -> list[dict[str, str]]:
        """Per image: seed, latent and pixel hash, worker."""
        workers = {img["index"]: img.get("worker_id") for img in answer["manifest"]["images"]}
        return [
            {"seed": img["seed"], "latent_sha256": img["latent_sha256"], "pixel_sha256": img["pixel_sha256"],
             "worker": workers.get(img["index"])}
            for img in answer["images"]
        ]

    @staticmethod
    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        """Bitwise equal latents and pixels."""
        return (a["latent_sha256"], a["pixel_sha256"]) == (b["latent_sha256"], b["pixel_sha256"])

    # ------------------------------------------------------------------ phases

    def execute(self) -> Report:
        """Every phase in order of importance; returns the report (also written to `out`)."""
        self.o.work.mkdir(parents=True, exist_ok=True)
        self._save()
        try:
            self.configure()
            self.phase("model", 0, ("model_built",), self.build_model)
            if not (self.registry.is_file() and self.model_dir.is_dir()):
                return self.report
            server = ("repeat", "key_fields", "n_image_vs_singles", "concurrency", "golden_suite", "worker_restart")
            self.phase("server", 2 + self.process_start_s() / self.seconds_per_image, server[:2], self.start_server)
            self.phase("n_image", 6, ("n_image_vs_singles",), self.check_n_image, needs_server=True)
            self.phase("concurrency", self.o.concurrency, ("concurrency",), self.check_concurrency, needs_server=True)
            self.phase("golden", 12, ("golden_suite",), self.check_golden, needs_server=True)
            self.phase("vae_guard", 2, ("fp16_vae_guard",), self.check_vae_guard)
            self.phase("two_workers", 2 + self.process_start_s() / self.seconds_per_image, ("two_workers",),
                       self.check_two_workers)
            # the restart kills the server's worker: after every other use of it but the latency
            self.phase("restart", 2 + self.process_start_s() / self.seconds_per_image, ("worker_restart",),
                       self.check_restart, needs_server=True)
            self.phase("latency", self.latency_images(), ("latency_measured",), self.measure_latency,
                       needs_server=True)
        finally:
            if self.server is not None:
                self.server.stop()
            self._save()
        return self.report

    def configure(self) -> None:
        """This process's torch gets the workers' determinism settings; record what the device is."""
        from app.devicecheck.probe import device_info
        from app.pipeline.determinism import configure_torch
        from app.pipeline.loader import quiet_libraries

        configure_torch(self.o.device, self.o.threads, True)
        quiet_libraries()
        self.report.device = device_info(self.o.device)
        self._save()

    def process_start_s(self) -> float:
        """About how long a worker process takes to start (import, load), for budgeting."""
        return 20.0 if self.o.kind == "cuda" else 10.0

    def build_model(self) -> None:
        """Build the random-weight model from the shipped SD1.5 config folder and register it."""
        from app.models.build import file_sha256s
        from app.models.fullsize import (
            FULLSIZE_SEED,
            SD15_CONFIG_DIR,
            TINY_OVERRIDES,
            build_from_configs,
            parameter_counts,
        )

        overrides = TINY_OVERRIDES if self.o.variant == "tiny" else None
        recipe = {"variant": self.o.variant, "dtype": self.o.dtype, "seed": FULLSIZE_SEED, "overrides": overrides}
        stamp = self.o.work / "model.json"  # a rerun with the same --work reuses the folder it built
        started = time.monotonic()
        reused = stamp.is_file() and json.loads(stamp.read_text()) == recipe and self.model_dir.is_dir()
        if not reused:
            stamp.unlink(missing_ok=True)
            build_from_configs(SD15_CONFIG_DIR, self.model_dir, seed=FULLSIZE_SEED, dtype=self.o.dtype,
                               overrides=overrides)
            stamp.write_text(json.dumps(recipe))
        build_s = time.monotonic() - started
        files = file_sha256s(self.model_dir)  # pinned in the registry: the server verifies every byte it loads
        size = sum((self.model_dir / rel).stat().st_size for rel in files)
        self.registry.write_text(yaml.safe_dump(self.registry_document(files), sort_keys=False))
        params = parameter_counts(SD15_CONFIG_DIR, overrides)
        self.report.model = {
            "id": MODEL_ID, "variant": self.o.variant, "dtype": self.o.dtype, "seed": FULLSIZE_SEED,
            "config_folder": "app/models/configs/sd15", "overrides": overrides, "parameters": params,
            "parameters_total": sum(params.values()), "bytes": size, "build_seconds": round(build_s, 2),
            "reused": reused, "files": files,
        }
        self.report.add_check(Check("model_built", "pass",
                                    f"{self.o.variant} SD1.5 architecture, {sum(params.values()):,} parameters, "
                                    f"{size / 2**20:.1f} MiB {self.o.dtype}, "
                                    + ("reused from --work" if reused else f"built in {build_s:.1f}s"),
                                    {"files": len(files)}, round(build_s, 3)))

    def registry_document(self, files: dict[str, str]) -> dict[str, Any]:
        """A one-model registry for the built folder, every file pinned."""
        return {
            "version": 1,
            "default_model": MODEL_ID,
            "models": [{
                "id": MODEL_ID,
                "family": "sd1",
                "description": f"devicecheck: {self.o.variant} SD1.5 architecture, random weights",
                "source": {"local": "model"},
                "dtype": self.o.dtype,
                "defaults": {"width": self.o.size, "height": self.o.size, "steps": self.o.check_steps,
                             "guidance_scale": 7.5, "sampler": "pndm"},
                "limits": {"size_multiple": 8, "min_size": 16, "max_size": max(1024, self.o.size),
                           "max_pixels": max(1024 * 1024, self.o.size * self.o.size * 2), "max_steps": 150},
                "sha256": files,
            }],
        }

    def server_env(self, workers: str) -> dict[str, str]:
        """The environment of the devicecheck server."""
        return {
            "SAMESEED_MODELS": str(self.registry),
            "SAMESEED_DEFAULT_MODEL": MODEL_ID,
            "SAMESEED_WORKERS": workers,
            "SAMESEED_CPU_THREADS": str(self.o.threads),
            "SAMESEED_CONSISTENCY_INTERVAL_S": "0",
            "SAMESEED_LOG_LEVEL": "warning",
            "SAMESEED_JOB_TIMEOUT_S": "900",
        }

    def start_server(self) -> None:
        """Start `python -m app serve` on the built model (one worker on the GPU, or one CPU worker)."""
        from app.cli.server_process import ServerProcess

        workers = "cuda" if self.o.kind == "cuda" else "cpu:1"
        server = ServerProcess(self.o.work / "data", **self.server_env(workers))
        try:
            ready_s = server.start(wait_ready=False).wait_ready(deadline_s=max(60.0, self.budget.remaining()))
        except BaseException:
            server.stop()
            raise
        self.server = server
        self.report.add_measure(Measure("time to ready (server start to /readyz 200)", round(ready_s, 2), "s"))
        self.record_worker_memory("server worker")
        self.check_repeat()
        self.check_key_fields()

    def single(self, seed: int) -> dict[str, str]:
        """The hashes of a one-image request for `seed` (made once, then reused)."""
        if seed not in self.singles:
            self.singles[seed] = self.hashes(self.request(seed=seed))[0]
        return self.singles[seed]

    def check_repeat(self) -> None:
        """Two identical requests give the same latents and pixels."""
        started = time.monotonic()
        first = self.single(100)
        again = self.hashes(self.request(seed=100))[0]
        ok = self.same(first, again)
        self.report.add_check(Check("repeat", "pass" if ok else "fail",
                                    "same request twice: bitwise equal" if ok else "same request twice: DIFFERENT",
                                    {"first": first, "second": again}, round(time.monotonic() - started, 3)))

    def check_key_fields(self) -> None:
        """The manifest records what makes the bits: GPU name, SM count, capability, CUDA, cuDNN, flags."""
        from app.devicecheck.probe import key_field_problems

        answer = self.request(seed=100)
        runtime = answer["manifest"]["runtime"]
        problems = key_field_problems(runtime, self.o.kind, self.o.threads, expected=self.report.device)
        fields = ("device_kind", "device_name", "cuda_capability", "cpu_capability", "torch_threads",
                  "deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark", "tf32_matmul",
                  "tf32_cudnn", "cublas_workspace_config", "attention_backend", "noise_device",
                  "reproducibility_key")
        evidence = {f: runtime.get(f) for f in fields}
        evidence["versions"] = runtime.get("versions")
        evidence["model_dtype"] = answer["manifest"]["model"]["dtype"]
        capability = runtime.get("cuda_capability") or runtime.get("cpu_capability")
        key = str(runtime.get("reproducibility_key", ""))[:16]
        found = f"{runtime.get('device_name')}, capability {capability}, key {key}…"
        detail = "; ".join(problems) if problems else found
        self.report.add_check(Check("key_fields", "fail" if problems else "pass", detail, evidence))

    def check_n_image(self) -> None:
        """Image k of an n-image request equals a single request with seed + k."""
        started = time.monotonic()
        batch = self.hashes(self.request(seed=200, num_images=3))
        singles = [self.single(200 + k) for k in range(3)]
        bad = [k for k in range(3) if not self.same(batch[k], singles[k])]
        self.report.add_check(Check(
            "n_image_vs_singles", "fail" if bad else "pass",
            f"3-image request vs 3 singles: images {bad} differ" if bad else "3-image request == 3 singles, bitwise",
            {"batch": batch, "singles": singles}, round(time.monotonic() - started, 3)))

    def check_concurrency(self) -> None:
        """Concurrent requests, shuffled with each other, each give their single-request bits."""
        started = time.monotonic()
        seeds = [200 + k for k in range(min(3, self.o.concurrency))] + [100]
        seeds += [300 + k for k in range(max(0, self.o.concurrency - len(seeds)))]
        with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
            got = list(pool.map(lambda s: self.hashes(self.request(seed=s))[0], seeds))
        expected = [self.single(s) for s in seeds]
        bad = [s for s, a, b in zip(seeds, got, expected, strict=True) if not self.same(a, b)]
        self.report.add_check(Check(
            "concurrency", "fail" if bad else "pass",
            f"{len(seeds)} concurrent requests: seeds {bad} differ from their sequential runs" if bad
            else f"{len(seeds)} concurrent requests == their sequential runs, bitwise",
            {"seeds": seeds, "concurrent": got, "sequential": expected}, round(time.monotonic() - started, 3)))

    def check_golden(self) -> None:
        """The golden suite runs on the worker and agrees with the baselines it recorded at start."""
        started = time.monotonic()
        runs = []
        for _ in range(2):  # the start-up run records baselines; a run after it must be consistent
            response = self.server.client.post("/v1/consistency/run", timeout=max(60.0, self.budget.remaining()))
            if response.status_code != 200:
                raise RuntimeError(f"/v1/consistency/run answered {response.status_code}: {response.text[:300]}")
            runs.append(response.json())
            if all(w["state"] == "consistent" for w in runs[-1]["workers"]):
                break
        last = runs[-1]
        states = {w["id"]: w["state"] for w in last["workers"]}
        cases = sum(len(w["cases"]) for w in last["workers"])
        ok = bool(states) and all(s == "consistent" for s in states.values())
        self.report.add_check(Check(
            "golden_suite", "pass" if ok else "fail",
            f"{cases} golden cases, workers {states}",
            {"status": [r["status"] for r in runs],
             "cases": [{k: c.get(k) for k in ("name", "state", "actual_latent_sha256", "error")}
                       for w in last["workers"] for c in w["cases"]]},
            round(time.monotonic() - started, 3)))

    def check_restart(self) -> None:
        """SIGKILL the worker; the pool restarts it; the same request gives the same bits."""
        before = self.single(100)
        worker = self.server.client.get("/readyz").json()["workers"][0]
        old_pid = worker["pid"]
        started = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + max(30.0, min(300.0, self.budget.remaining()))
        now: dict[str, Any] = {}
        while time.monotonic() < deadline:
            response = self.server.client.get("/readyz")
            now = next((w for w in response.json()["workers"] if w["id"] == worker["id"]), {})
            if now.get("state") in ("ready", "busy") and now.get("pid") not in (None, old_pid):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"worker {worker['id']} not ready again within the deadline: {now}")
        restart_s = time.monotonic() - started
        after = self.hashes(self.request(seed=100))[0]
        ok = self.same(before, after)
        self.report.add_measure(Measure("time to ready after a worker restart", round(restart_s, 2), "s"))
        self.report.add_check(Check(
            "worker_restart", "pass" if ok else "fail",
            f"SIGKILLed pid {old_pid}; pid {now.get('pid')} ready in {restart_s:.1f}s; "
            + ("same bits" if ok else "DIFFERENT bits"),
            {"before": before, "after": after, "old_pid": old_pid, "new_pid": now.get("pid"),
             "restarts": now.get("restarts")}, round(restart_s, 3)))

    def record_worker_memory(self, label: str, pids: list[int] | None = None) -> None:
        """GPU memory (CUDA) and peak RSS of the server's workers, or of `pids`."""
        from app.devicecheck.probe import gpu_memory_by_pid, peak_rss_mib

        if pids is None:
            pids = [w["pid"] for w in self.server.client.get("/readyz").json()["workers"] if w.get("pid")]
        if self.o.kind == "cuda":
            by_pid = gpu_memory_by_pid()
            values = [by_pid[p] for p in pids if p in by_pid]
            self.report.add_measure(Measure(f"GPU memory per {label}", max(values) if values else None, "MiB",
                                            detail=f"nvidia-smi, pids {pids}"))
        rss = [r for r in (peak_rss_mib(p) for p in pids) if r is not None]
        self.report.add_measure(Measure(f"peak RSS per {label}", max(rss) if rss else None, "MiB",
                                        detail=f"VmHWM, pids {pids}"))

    def check_vae_guard(self) -> None:
        """Force a float16 VAE overflow; the guard must decode the same latents again in float32."""
        from app.devicecheck.guard import forced_overflow_check

        started = time.monotonic()
        ok, detail, evidence = forced_overflow_check(self.model_dir / "vae", self.torch_device(), self.o.size)
        self.report.add_check(Check("fp16_vae_guard", "pass" if ok else "fail", detail, evidence,
                                    round(time.monotonic() - started, 3)))

    def torch_device(self) -> str:
        """The torch device of this process (it sees the chosen GPU as cuda:0)."""
        from app.pipeline.determinism import torch_device

        return torch_device(self.o.device)

    def check_two_workers(self) -> None:
        """Two worker processes of the real pool render the same image; both equal the server's."""
        from app.devicecheck.pool import render_on_workers

        started = time.monotonic()
        reference = self.single(100) if self.server is not None else None
        result = render_on_workers(self, seed=100, count=2,
                                   timeout_s=max(60.0, min(400.0, self.budget.remaining())))
        hashes = [{"worker": r.image.worker_id, "latent_sha256": r.image.latent_sha256,
                   "pixel_sha256": r.image.pixel_sha256,
                   "reproducibility_key": r.runtime.get("reproducibility_key")} for r in result.images]
        keys = {h["reproducibility_key"] for h in hashes}
        same = all(self.same(h, hashes[0]) for h in hashes)
        server_same = reference is None or self.same(hashes[0], reference)
        ok = same and server_same and len(keys) == 1
        for label, value, unit in result.measures:
            self.report.add_measure(Measure(label, value, unit))
        self.report.add_check(Check(
            "two_workers", "pass" if ok else "fail",
            f"{len(hashes)} pool worker processes (pids {result.pids}) "
            + ("agree with each other and the server's worker" if ok else "DISAGREE"),
            {"workers": hashes, "server": reference, "one_key": len(keys) == 1},
            round(time.monotonic() - started, 3)))

    def latency_images(self) -> float:
        """The latency phase's cost in check-size images (its images have `steps` steps)."""
        return (3 * self.o.runs + 3) * self.o.steps / self.o.check_steps + self.process_start_s() / 4

    def measure_latency(self) -> None:
        """End-to-end service latency vs plain diffusers in this process, interleaved; determinism's cost."""
        from app.devicecheck.direct import DirectPipeline

        body = {"seed": 7, "steps": self.o.steps, "negative_prompt": ""}
        direct = DirectPipeline(self.model_dir, self.o.dtype, self.o.device, self.o.threads)
        direct.call(self.o.size, self.o.steps, seed=7)  # warm both sides
        self.request(**body)
        service: list[float] = []
        plain: list[float] = []
        for i in range(self.o.runs):
            if i and self.budget.remaining() < 0:  # out of time: keep the runs made
                self.report.budget_exhausted = True
                break
            for side in (("s", "d") if i % 2 == 0 else ("d", "s")):
                if side == "s":
                    t = time.monotonic()
                    self.request(**body)
                    service.append(time.monotonic() - t)
                else:
                    plain.append(direct.call(self.o.size, self.o.steps, seed=7))
        direct.determinism(False)
        direct.call(self.o.size, self.o.steps, seed=7)  # warm the other kernels
        loose = [direct.call(self.o.size, self.o.steps, seed=7) for _ in range(len(plain))]
        s_med, d_med, l_med = statistics.median(service), statistics.median(plain), statistics.median(loose)
        ratio = s_med / d_med
        shape = f"{self.o.size}x{self.o.size} {self.o.steps}-step PNDM, {self.o.dtype}"
        self.report.add_measure(Measure("service end-to-end per image, median", round(s_med, 4), "s",
                                        detail=shape + ANCHORS if self.o.variant == "full" else shape))
        self.report.add_measure(Measure("plain diffusers per image, median", round(d_med, 4), "s",
                                        detail=shape + ", same determinism settings"))
        self.report.add_measure(Measure("service / plain diffusers", round(ratio, 4), "x", "<= 1.05",
                                        ratio <= 1.05))
        self.report.add_measure(Measure("plain diffusers, determinism settings off", round(l_med, 4), "s",
                                        detail=direct.loose_settings))
        self.report.add_measure(Measure("cost of the determinism settings (on / off)", round(d_med / l_med, 4),
                                        "x", detail="for the record only"))
        self.report.add_check(Check("latency_measured", "pass", f"service {s_med:.3f}s vs plain {d_med:.3f}s "
                                    f"per image ({ratio:.3f}x), {shape}",
                                    {"service_s": service, "plain_s": plain, "plain_loose_s": loose}))
        direct.close()


def execute(options: Options) -> Report:
    """Run every phase; removes a temporary work folder afterwards."""
    return Run(options).execute()


def default_work() -> Path:
    """A fresh temporary work folder."""
    return Path(tempfile.mkdtemp(prefix="sameseed-devicecheck-"))


def remove_work(path: Path) -> None:
    """Delete a work folder devicecheck made."""
    shutil.rmtree(path, ignore_errors=True)
