"""deploy/monitoring checked offline: promtool and amtool on the rules and configs, and the rules, dashboard,
README runbook and compose profile agreeing with the series the service exports."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from app.cli.server_process import ROOT
from app.telemetry.metrics import Metrics

KIT = ROOT / "deploy" / "monitoring"
RULE_FILES = sorted((KIT / "rules").glob("*.yml"))
DASHBOARD = KIT / "grafana" / "dashboards" / "sameseed.json"
SERIES_NAME = re.compile(r"\b(?:sameseed_\w+|[a-z_]+:sameseed_\w+:\w+)")


def tool(name):
    """A binary of Debian's prometheus / prometheus-alertmanager packages (`make monitoring-tools` installs them)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make monitoring-tools` (Debian's prometheus packages)")
    return path


def run(*command, cwd=KIT):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)


def rules(kind):
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if kind in rule]


def exported_series():
    """Every series name the service can export (counters with _total, histograms with their three)."""
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def dashboard_exprs():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    return dashboard, exprs


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    checked = run(tool("promtool"), "check", "rules", *map(str, RULE_FILES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(tool("promtool"), "test", "rules", "tests/sameseed.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_a_broken_rule_fails_its_unit_test(tmp_path):
    copy = tmp_path / "monitoring"
    shutil.copytree(KIT, copy)
    alerts = copy / "rules" / "sameseed-alerts.yml"
    alerts.write_text(alerts.read_text().replace('state="drifted"} == 1', 'state="drifted"} == 2'))
    tested = run(tool("promtool"), "test", "rules", "tests/sameseed.test.yml", cwd=copy)
    assert tested.returncode != 0 and "SameseedWorkerDrifted" in tested.stdout + tested.stderr


def test_every_alert_is_tested_firing_and_quiet_and_has_a_summary_severity_and_runbook():
    cases = [case for test in yaml.safe_load((KIT / "tests" / "sameseed.test.yml").read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    readme = (ROOT / "README.md").read_text()
    runbook = readme[readme.index("### Runbook"):]
    for rule in rules("alert"):
        name = rule["alert"]
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), f"{name} never tested firing"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in cases), f"{name} never tested quiet"
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook"].endswith(f"> {name}")
        assert f"**{name}**" in runbook, f"no runbook line for {name} in README.md"


def test_rules_and_dashboard_read_only_series_that_exist():
    known = exported_series() | {r["record"] for r in rules("record")}
    _, exprs = dashboard_exprs()
    for expr in [r["expr"] for r in rules("alert") + rules("record")] + exprs:
        unknown = set(SERIES_NAME.findall(expr)) - known
        assert not unknown, f"{expr!r} reads series nobody exports: {unknown}"


def test_dashboard_is_one_provisioned_dashboard_on_the_chosen_datasource():
    dashboard, exprs = dashboard_exprs()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "sameseed"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for subject in ("images/s", "latency", "queue depth", "queue wait", "workers per state", "consistency state",
                    "restarts", "retries", "upcasts", "429"):
        assert subject in titles, subject
    provider = yaml.safe_load((KIT / "grafana" / "provisioning" / "dashboards" / "sameseed.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_and_alertmanager_configs_are_valid(tmp_path):
    config = yaml.safe_load((KIT / "prometheus.yml").read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == ["sameseed"]  # SameseedDown selects it
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]  # where compose mounts rules/
    config["rule_files"] = [str(KIT / "rules" / "*.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = run(tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0 and "SUCCESS: 2 rule files found" in checked.stdout, checked.stdout + checked.stderr
    checked = run(tool("amtool"), "check-config", "alertmanager.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_monitoring_profile_pins_official_images_and_mounts_the_kit():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    monitoring = {name: s for name, s in services.items() if s.get("profiles") == ["monitoring"]}
    assert set(monitoring) == {"prometheus", "alertmanager", "grafana"}
    for name, service in monitoring.items():
        assert re.fullmatch(r"(prom|grafana)/[a-z]+:v?[0-9.]+@sha256:[0-9a-f]{64}", service["image"]), name
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts a missing {source}"
        assert all(port.split(":")[0].startswith("${") for port in service["ports"]), "published ports are settable"


def test_the_readme_scrape_config_for_your_own_prometheus_is_valid(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**With your own Prometheus.**"):]
    snippet = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    (tmp_path / "prometheus.yml").write_text(snippet)
    for path in RULE_FILES:
        shutil.copy(path, tmp_path)
    checked = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0 and "SUCCESS: 10 rules found" in checked.stdout, checked.stdout + checked.stderr
    assert yaml.safe_load(snippet)["scrape_configs"][0]["job_name"] == "sameseed"
