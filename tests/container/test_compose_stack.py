"""The image as it ships, run by `docker compose` (cpu profile): health, bits, identity, user, state, stop.

Run by `make container-test` (tests/container/container-test.sh), which builds the image and names it in
SAMESEED_CT_IMAGE; `make test` does not collect this folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.cli.server_process import ROOT, ServerProcess, free_port
from app.provenance.key import KEY_RUNTIME_FIELDS, KEY_VERSION_FIELDS

IMAGE = os.environ.get("SAMESEED_CT_IMAGE", "")
SERVICE = "sameseed-cpu"
PROJECT = "sameseed-ct"
REQUEST = {"prompt": "a lighthouse at dusk", "seed": 1234}
GRACE_S = 90  # docker-compose.yml's stop_grace_period
DATA_UID = 10001

pytestmark = pytest.mark.skipif(not IMAGE, reason="needs the image make container-test builds (SAMESEED_CT_IMAGE)")


class Stack:
    """One compose project of docker-compose.yml + compose.test.yml, on a free loopback port."""

    def __init__(self, project: str, **env: str) -> None:
        self.project = project
        self.port = free_port()
        self.env = {**os.environ, "SAMESEED_CT_IMAGE": IMAGE, "SAMESEED_CT_PORT": str(self.port), **env}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=300.0)

    def compose(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run `docker compose ARGS` for this project; a failure shows compose's output."""
        command = ["docker", "compose", "-f", "docker-compose.yml", "-f", "tests/container/compose.test.yml"]
        command += ["-p", self.project, "--profile", "cpu", *args]
        result = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def up(self) -> None:
        """Create and start the service from the built image (never build or pull here)."""
        self.compose("up", "--detach", "--no-build", "--pull", "never", SERVICE)

    def state(self) -> dict:
        """Compose's view of the service container: State, Health, ExitCode and the rest."""
        out = self.compose("ps", "--all", "--format", "json", SERVICE).stdout.strip()
        rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines() if line]
        assert len(rows) == 1, rows
        return rows[0]

    def wait_health(self, wanted: str, deadline_s: float) -> list[str]:
        """Poll compose's health status until `wanted`; returns the statuses seen, in order, repeats dropped."""
        seen: list[str] = []
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            state = self.state()
            if not seen or seen[-1] != state["Health"]:
                seen.append(state["Health"])
            if state["Health"] == wanted:
                return seen
            if state["State"] != "running" or state["Health"] == "unhealthy":
                break
            time.sleep(0.5)
        raise AssertionError(f"health {wanted!r} not reached (seen {seen}, now {state}):\n{self.logs()}")

    def container(self) -> dict:
        """`docker inspect` of the service container."""
        cid = self.compose("ps", "--all", "--quiet", SERVICE).stdout.strip()
        inspected = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True)
        return json.loads(inspected.stdout)[0]

    def python(self, code: str) -> str:
        """Run Python code in the running container (as the image's user); returns its stdout."""
        return self.compose("exec", "-T", SERVICE, "python", "-c", code).stdout

    def logs(self) -> str:
        """The end of the service's log."""
        return self.compose("logs", "--no-color", SERVICE, check=False).stdout[-6000:]

    def generate(self, **body: object) -> dict:
        """POST /v1/generations; asserts a 200."""
        response = self.client.post("/v1/generations", json={**REQUEST, **body})
        assert response.status_code == 200, response.text
        return response.json()

    def down(self, *flags: str) -> None:
        """`docker compose down` (named volumes stay unless -v is given)."""
        self.compose("down", "--timeout", str(GRACE_S), *flags)


@pytest.fixture(scope="module")
def stack():
    """The cpu service, up and healthy; the health statuses seen on the way are in stack.first_health."""
    stack = Stack(PROJECT)
    stack.down("--volumes")  # what an interrupted earlier run left
    stack.up()
    try:
        stack.first_health = stack.wait_health("healthy", deadline_s=300)
        yield stack
    finally:
        stack.down("--volumes")
        stack.client.close()


@pytest.fixture(scope="module")
def first(stack):
    """The first generation of the module, made in the container, with the signing keys listed then."""
    generation = stack.generate()
    generation["keys_then"] = stack.client.get("/v1/keys").json()
    return generation


def key_fields(manifest: dict) -> dict:
    """What the reproducibility key hashes, as readable fields."""
    runtime = manifest["runtime"]
    return {
        "model": manifest["model"],
        **{name: runtime.get(name) for name in KEY_RUNTIME_FIELDS},
        **{f"versions.{name}": runtime["versions"].get(name) for name in KEY_VERSION_FIELDS},
    }


def test_health_goes_from_starting_to_healthy(stack):
    assert stack.first_health == ["starting", "healthy"]
    assert stack.client.get("/readyz").status_code == 200


def test_generation_equals_the_host_venv_server_bit_for_bit_when_keys_are_equal(stack, first, tmp_path):
    host = ServerProcess(tmp_path / "host").start()
    try:
        response = host.post(**REQUEST)
    finally:
        host.stop()
    assert response.status_code == 200, response.text
    outside = response.json()
    inside_key = first["manifest"]["runtime"]["reproducibility_key"]
    outside_key = outside["manifest"]["runtime"]["reproducibility_key"]
    if inside_key == outside_key:
        assert [i["pixel_sha256"] for i in first["images"]] == [i["pixel_sha256"] for i in outside["images"]]
        assert [i["latent_sha256"] for i in first["images"]] == [i["latent_sha256"] for i in outside["images"]]
        print(f"container and host .venv: equal keys ({inside_key}), equal bits")
        return
    inside_fields, outside_fields = key_fields(first["manifest"]), key_fields(outside["manifest"])
    differing = {k: (v, outside_fields[k]) for k, v in inside_fields.items() if v != outside_fields[k]}
    print(f"reproducibility keys differ (container, host): {differing}")
    # Unequal keys promise nothing across the two; each side still repeats its own bits.
    assert differing, "unequal keys must come from a differing key field"
    again = stack.generate()
    assert [i["pixel_sha256"] for i in again["images"]] == [i["pixel_sha256"] for i in first["images"]]


def test_manifest_runtime_image_carries_the_oci_labels(first):
    inspected = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, text=True, check=True)
    labels = json.loads(inspected.stdout)[0]["Config"]["Labels"]
    assert first["manifest"]["runtime"]["image"] == {
        "version": labels["org.opencontainers.image.version"],
        "revision": labels["org.opencontainers.image.revision"],
        "base": labels["org.opencontainers.image.base.name"],
    }
    # the commit the image was built from (container-test.sh passes it as SAMESEED_REVISION)
    revision = labels["org.opencontainers.image.revision"]
    assert revision == os.environ["SAMESEED_CT_REVISION"]
    kind = subprocess.run(["git", "cat-file", "-t", revision.removesuffix("-dirty")], cwd=ROOT, capture_output=True,
                          text=True)
    assert kind.stdout.strip() == "commit", revision
    assert labels["io.sameseed.python.source"] == "base"


def test_server_and_worker_run_as_uid_10001_and_write_the_named_volume(stack, first):
    owners = json.loads(
        stack.python(
            "import json, os, pathlib\n"
            "procs = {}\n"
            "for p in pathlib.Path('/proc').iterdir():\n"
            "    if p.name.isdigit() and (p / 'cmdline').exists():\n"
            "        cmd = (p / 'cmdline').read_bytes().replace(b'\\0', b' ').decode().strip()\n"
            "        status = (p / 'status').read_text().splitlines()\n"
            "        uid = [line.split()[1] for line in status if line.startswith('Uid:')]\n"
            "        procs[cmd] = int(uid[0])\n"
            "files = {str(f): f.stat().st_uid for f in pathlib.Path('/data').rglob('*')}\n"
            "print(json.dumps({'procs': procs, 'files': files}))"
        )
    )
    servers = {cmd: uid for cmd, uid in owners["procs"].items() if "app serve" in cmd}
    workers = {cmd: uid for cmd, uid in owners["procs"].items() if "multiprocessing" in cmd}
    assert servers and set(servers.values()) == {DATA_UID}, owners["procs"]
    assert workers and set(workers.values()) == {DATA_UID}, owners["procs"]
    generation_id = first["id"]
    written = [path for path in owners["files"] if f"/{generation_id}/" in path]
    assert any(path.endswith("/0.png") for path in written), sorted(owners["files"])
    assert set(owners["files"].values()) == {DATA_UID}
    data_mount = next(m for m in stack.container()["Mounts"] if m["Destination"] == "/data")
    assert data_mount["Type"] == "volume" and data_mount["Name"] == f"{PROJECT}_sameseed-data"


def test_a_sigkilled_worker_is_restarted_and_serves_the_same_bits(stack, first):
    worker = stack.client.get("/readyz").json()["workers"][0]
    stack.python(f"import os, signal; os.kill({worker['pid']}, signal.SIGKILL)")
    end = time.monotonic() + 240
    while time.monotonic() < end:
        now = stack.client.get("/readyz").json()["workers"][0]
        if now["pid"] != worker["pid"] and now["state"] == "ready":
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker not back: {now}\n{stack.logs()}")
    assert now["restarts"] == worker["restarts"] + 1
    again = stack.generate()
    assert [i["pixel_sha256"] for i in again["images"]] == [i["pixel_sha256"] for i in first["images"]]


def test_compose_stop_lets_the_running_job_finish_and_the_container_exits_0(stack):
    answer: dict[str, httpx.Response] = {}
    slow = {"steps": 40, "num_images": 4}  # several seconds on the tiny model: the stop lands mid-job
    request = threading.Thread(target=lambda: answer.update(r=stack.client.post("/v1/generations",
                                                                                json={**REQUEST, **slow})))
    request.start()
    end = time.monotonic() + 60
    while stack.client.get("/readyz").json()["workers"][0]["state"] != "busy":
        assert time.monotonic() < end, "the job never started"
        time.sleep(0.05)
    started = time.monotonic()
    stack.compose("stop", SERVICE, timeout=GRACE_S + 30)
    stopped_in = time.monotonic() - started
    request.join(timeout=30)
    assert answer["r"].status_code == 200, answer["r"].text
    state = stack.container()["State"]
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False)
    assert stopped_in < GRACE_S
    print(f"compose stop with a job running: {stopped_in:.1f}s")


def test_down_and_up_keep_the_ledger_images_and_signing_key(stack, first):
    stack.down()  # no --volumes: what a server upgrade does
    stack.up()
    assert stack.wait_health("healthy", deadline_s=300)[0] == "starting"
    record = stack.client.get(f"/v1/generations/{first['id']}")
    assert record.status_code == 200, record.text
    assert record.json()["manifest"] == first["manifest"]
    png = stack.client.get(first["images"][0]["url"])
    assert png.status_code == 200
    verdict = stack.client.post("/v1/verify", content=png.content, headers={"Content-Type": "image/png"}).json()
    assert (verdict["valid"], verdict["signature_valid"], verdict["pixels_match"], verdict["known_to_ledger"]) == (
        True, True, True, True), verdict
    assert stack.client.get("/v1/keys").json() == first["keys_then"]


def test_health_turns_unhealthy_when_the_model_is_missing(tmp_path: Path):
    # the team-server registry names hub models; none was pulled into this fresh project's volumes
    missing = Stack(
        f"{PROJECT}-nomodel",
        SAMESEED_CT_MODELS="/srv/sameseed/deploy/registry.yaml",
        SAMESEED_CT_DEFAULT_MODEL="sd15",
        SAMESEED_CT_START_PERIOD="3s",
    )
    missing.down("--volumes")
    missing.up()
    try:
        seen = missing.wait_health("unhealthy", deadline_s=180)
        assert seen[0] == "starting" and seen[-1] == "unhealthy" and "healthy" not in seen, seen
        # the cause, as /readyz names it: the worker failed on the model that was never pulled
        end = time.monotonic() + 180
        while (ready := missing.client.get("/readyz")).json()["workers"][0]["state"] != "failed":
            assert ready.status_code == 503 and time.monotonic() < end, ready.text
            time.sleep(0.5)
        assert ready.status_code == 503
        error = ready.json()["workers"][0]["last_error"]
        assert error.startswith("model_unavailable") and "models pull sd15" in error, error
        assert missing.state()["Health"] == "unhealthy"  # and it stays so
    finally:
        missing.down("--volumes")
        missing.client.close()
