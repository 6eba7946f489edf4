"""A one-node Ray cluster for the bench and the tests: `ray start --head --block` on free ports, stopped by pid.

The head and every process it starts (GCS, raylet, agents, workers, Serve replicas) run in a
session of their own, so stopping signals exactly that session's processes, by pid, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.cli.server_process import ROOT, free_port, process_stats


class LocalRayCluster:
    """A Ray head with `num_cpus` logical CPUs in a temporary directory, reachable at `address`."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        # Ray's Unix sockets live under --temp-dir: a short path keeps them under the 107-byte limit
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sameseed-ray-"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = self.temp_dir / "head.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, deadline_s: float = 120.0) -> LocalRayCluster:
        """Start the head and wait until it accepts drivers."""
        command = [
            sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--port", str(self.port), "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats",
            "--temp-dir", str(self.temp_dir),
            # every fixed default port moved to a free one: other clusters and servers may run here
            "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
        ]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        end = time.monotonic() + deadline_s
        while "This command will now block" not in self.logs():
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.logs()}")
            if time.monotonic() > end:
                self.stop()
                raise TimeoutError(f"the Ray head did not start within {deadline_s}s:\n{self.logs()}")
            time.sleep(0.1)
        return self

    def logs(self, tail: int = 5000) -> str:
        """The end of the head's log."""
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every process of the head's session (Ray workers have groups of their own), then SIGKILL."""
        if self.process is None:
            return
        session = self.process.pid  # start_new_session: the session id is the head's pid
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            for pid in session_members(session):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            end = time.monotonic() + wait_s
            while time.monotonic() < end and session_members(session):
                self.process.poll()  # reap the head itself: a zombie still counts as a member
                time.sleep(0.1)
            if not session_members(session):
                break
        self.process.wait(timeout=5)
        self.process = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def session_members(session: int) -> list[int]:
    """Pids of the live processes of one session (Linux /proc), zombies left out."""
    return [pid for pid, fields in process_stats() if int(fields[3]) == session and fields[0] != "Z"]
