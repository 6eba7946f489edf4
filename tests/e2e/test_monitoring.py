"""From drift to a page: a real Prometheus with deploy/monitoring's rules scrapes a real server, and a real
Alertmanager with deploy/monitoring's routes delivers the drift alert to a webhook."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from app.cli.server_process import free_port
from tests.e2e.conftest import ROOT

KIT = ROOT / "deploy" / "monitoring"


def binary(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make monitoring-tools` (Debian's prometheus packages)")
    return path


def poll(check, what, deadline_s=60.0):
    """Call check() until it returns something truthy; fail naming `what` after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline_s:g}s")
        time.sleep(0.1)


class Webhook:
    """A pager stand-in: records every Alertmanager notification POSTed to it, by path."""

    def __init__(self) -> None:
        received: list[tuple[str, dict]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notifications(self, path, alertname, status):
        return [n for p, n in self.received if p == path and n["status"] == status
                and any(a["labels"]["alertname"] == alertname for a in n["alerts"])]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Daemon:
    """A child process on a loopback port, ready when `ready_path` answers 200; logs kept for failures."""

    def __init__(self, command: list[str], port: int, ready_path: str, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=10.0)

        def ready():
            assert self.process.poll() is None, f"{command[0]} exited:\n{self.logs()}"
            try:
                return self.client.get(ready_path).status_code == 200
            except httpx.TransportError:
                return False

        poll(ready, f"{command[0]} ready", deadline_s=30)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.client.close()


@pytest.fixture()
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture()
def alertmanager(tmp_path, webhook):
    """deploy/monitoring/alertmanager.yml with its receivers pointed at the webhook and its waits cut to 1 s."""
    config = yaml.safe_load((KIT / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"{webhook.url}/{receiver['name']}"
    config["route"].update(group_wait="1s", group_interval="1s")
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    daemon = Daemon(
        [
            binary("prometheus-alertmanager"),
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port: one instance
        ],
        port,
        "/-/ready",
        tmp_path / "alertmanager.log",
    )
    yield daemon
    daemon.stop()


def start_prometheus(tmp_path, target_url, alertmanager_url):
    """Prometheus with the kit's rules, scraping the server as job `sameseed` every second."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in sorted((KIT / "rules").glob("*.yml"))],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_url.removeprefix("http://")]}]}]},
        "scrape_configs": [
            {"job_name": "sameseed", "static_configs": [{"targets": [target_url.removeprefix("http://")]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    return Daemon(
        [
            binary("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        port,
        "/-/ready",
        tmp_path / "prometheus.log",
    )


def query(prometheus, expr):
    """An instant query; asserts Prometheus evaluated it without error and returns the result list."""
    response = prometheus.client.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


def firing(prometheus):
    alerts = prometheus.client.get("/api/v1/alerts").json()["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("worker")) for a in alerts if a["state"] == "firing"}


def dashboard_queries():
    """Every PromQL query of the dashboard, with Grafana's variables filled in as a user's "All" would."""
    dashboard = json.loads((KIT / "grafana" / "dashboards" / "sameseed.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "instance")
    exprs.append(variable["definition"].removeprefix("label_values(").split(",")[0])  # its metric
    return [e.replace("$instance", ".*").replace("$__rate_interval", "5m") for e in exprs]


@pytest.mark.slow
def test_a_wrong_golden_baseline_fires_the_drift_alert_pages_and_resolves(make_server, tmp_path, alertmanager,
                                                                          webhook):
    srv = make_server("monitored")
    prometheus = start_prometheus(tmp_path, srv.url, alertmanager.url)  # scrapes from the server's first answer
    try:
        srv.start()
        # 1. Scraped and quiet: the start-up check recorded baselines; no alert of the kit fires.
        poll(lambda: query(prometheus, 'sameseed_consistency_state{job="sameseed", state="drifted"} == 0'),
             "first scrape")
        srv.generate(seed=1)  # two generations a scrape apart: the latency histograms get a rate
        poll(lambda: query(prometheus, "sameseed_generation_seconds_count == 1"), "first image scraped")
        srv.generate(seed=2)
        poll(lambda: query(prometheus, "sameseed_generation_seconds_count == 2"), "second image scraped")
        assert firing(prometheus) == set()

        # 2. A baseline with one wrong pixel hash: the re-check drifts and the alert fires, and pages.
        good = srv.client.get("/v1/consistency/baselines").json()
        bad = json.loads(json.dumps(good))
        bad["baselines"][0]["pixel_sha256"] = "0" * 64
        assert srv.client.put("/v1/consistency/baselines", json=bad).status_code == 200
        poll(lambda: ("SameseedWorkerDrifted", "w0") in firing(prometheus), "drift alert firing")
        assert firing(prometheus) == {("SameseedWorkerDrifted", "w0")}  # and nothing else
        page = poll(lambda: webhook.notifications("/page", "SameseedWorkerDrifted", "firing"), "the page")[0]
        assert page["commonLabels"]["severity"] == "critical" and page["commonLabels"]["worker"] == "w0"
        assert "drifted from its golden baseline" in page["commonAnnotations"]["summary"]
        assert not webhook.notifications("/ticket", "SameseedWorkerDrifted", "firing")

        # 3. Every dashboard query evaluates, and returns data, against this Prometheus.
        for expr in dashboard_queries():
            assert query(prometheus, expr), f"dashboard query returns nothing: {expr}"

        # 4. The right baseline again: the re-check is consistent, the alert resolves and the page says so.
        assert srv.client.put("/v1/consistency/baselines", params={"replace": "true"}, json=good).status_code == 200
        poll(lambda: not firing(prometheus), "drift alert resolved")
        poll(lambda: webhook.notifications("/page", "SameseedWorkerDrifted", "resolved"), "the resolved page")
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n--- prometheus log:\n{prometheus.logs()}") from None
    finally:
        prometheus.stop()
