"""The installable client: a wheel of the repository, in a venv without torch, run from outside the checkout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy
import pytest
from packaging.requirements import Requirement
from PIL import Image

from tests.e2e.conftest import ROOT


def dependency_closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions `requirements` need (extras and other platforms' markers left out)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        dist = metadata.distribution(requirement.name)
        name = dist.metadata["Name"].lower()
        if name not in found:
            found[name] = dist
            todo.extend(Requirement(r) for r in dist.requires or [])
    return found


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A venv holding the sameseed wheel and, linked offline from this venv, only its base dependencies."""
    work = tmp_path_factory.mktemp("client")
    source = work / "source"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(ROOT / "app", source / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", work / "wheel", source], check=True)
    wheel = next((work / "wheel").glob("sameseed-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True)
    # The base dependencies, offline: link each distribution's files from this venv into a folder on the new path.
    deps = work / "deps"
    deps.mkdir()
    for dist in dependency_closure(_base(wheel)).values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            target = Path(dist.locate_file(top))
            if target.exists() and not (deps / top).exists():
                (deps / top).symlink_to(target)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "base-deps.pth").write_text(f"{deps}\n")
    return venv


def _base(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist without extras: what `pip install sameseed` installs."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode().splitlines()
    requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in requires if "extra ==" not in r]


def sameseed(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [venv / "bin" / "sameseed", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_venv_has_no_server_dependencies(client_venv, tmp_path):
    python = client_venv / "bin" / "python"
    for module in ("torch", "fastapi", "diffusers"):
        assert subprocess.run([python, "-c", f"import {module}"], cwd=tmp_path, capture_output=True).returncode == 1
    check = subprocess.run([python, "-c", "import app, sys; print(app.__file__)"], cwd=tmp_path, capture_output=True)
    assert str(ROOT) not in check.stdout.decode()  # the installed copy, not the checkout
    serve = sameseed(client_venv, tmp_path, "serve")
    assert serve.returncode == 2 and "pip install 'sameseed[server]'" in serve.stderr


def test_the_installed_client_checks_a_live_server_from_outside_the_checkout(client_venv, server, tmp_path):
    health = sameseed(client_venv, tmp_path, "health", "--server", server.url)
    assert health.returncode == 0, health.stderr
    assert "ready" in health.stdout

    golden = sameseed(client_venv, tmp_path, "golden", "run", "--server", server.url, "--out", "report.json")
    assert golden.returncode == 0, golden.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] in ("consistent", "baseline_recorded") and report["workers"]

    first = sameseed(client_venv, tmp_path, "generate", "--server", server.url, "--prompt", "a cat", "--seed", "9")
    second = sameseed(client_venv, tmp_path, "generate", "--server", server.url, "--prompt", "a cat", "--seed", "9")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    seed, latent, pixel, path = first.stdout.splitlines()[0].split()
    assert seed == "9" and second.stdout.splitlines()[0].split()[:3] == [seed, latent, pixel]
    png = tmp_path / path
    pixels = numpy.asarray(Image.open(png).convert("RGB"), dtype=numpy.uint8)
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == pixel

    verify = sameseed(client_venv, tmp_path, "verify", str(png), "--server", server.url)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["valid"] is True

    other = second.stdout.splitlines()[0].split()[3]
    compare = sameseed(client_venv, tmp_path, "compare", str(png), other)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_an_unreachable_server_is_exit_2(client_venv, tmp_path):
    result = sameseed(client_venv, tmp_path, "health", "--server", "http://127.0.0.1:9")
    assert result.returncode == 2 and "sameseed:" in result.stderr
