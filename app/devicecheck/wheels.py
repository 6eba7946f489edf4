"""`make device-wheels`: the exact wheels a GPU machine without network needs beyond what it has.

The lent GPU machines (Python 3.12, x86_64, their own PyTorch) have no network; whatever else
devicecheck imports must travel with the working tree, at most 64 MiB in all. This plans the
wheels from `requirements.lock` (exact versions), leaves out torch and what the machine already
has, downloads them for cp312 manylinux x86_64, checks that every requirement of a carried wheel
is carried or already there, and prints their total size.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
DEFAULT_DEST = ROOT / ".device-wheels"
LIMIT_BYTES = 64 * 2**20
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64",
)

# The Python packages of the GPU machines' image ("cuda"), as the device tool's notes list them.
DEVICE_PREINSTALLED = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Carried at the lock's version even though the machine has another: they are in the reproducibility
# key (transformers) or must match it (its tokenizers and hub client), and they are small.
CARRY_LOCKED = frozenset({"transformers", "tokenizers", "huggingface-hub"})
# Never carried: the machine's own PyTorch and CUDA stack are what is being checked.
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(lock: Path = LOCK) -> dict[str, str]:
    """{normalized name: "Name==version"} of every `==` pin in a lock file."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line.strip())
        if match:
            pins[normalize(match.group(1))] = f"{match.group(1)}=={match.group(2)}"
    return pins


def plan(pins: dict[str, str], preinstalled: frozenset[str] = DEVICE_PREINSTALLED) -> list[str]:
    """The pins to carry: not torch or CUDA, and not already on the machine unless kept at the lock's version."""
    return sorted(
        pin for name, pin in pins.items()
        if not NEVER.match(name) and (name not in preinstalled or name in CARRY_LOCKED)
    )


def requirements_of(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def unmet(wheels: list[Path], preinstalled: frozenset[str] = DEVICE_PREINSTALLED) -> list[str]:
    """Requirements (for CPython 3.12 on Linux x86_64, no extras) that neither a carried wheel nor the machine meets."""
    from packaging.requirements import Requirement

    environment = {"python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.0",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
                   "extra": ""}
    carried = {normalize(w.name.split("-")[0]) for w in wheels}
    missing = []
    for wheel in wheels:
        for line in requirements_of(wheel):
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            name = normalize(requirement.name)
            if name not in carried and name not in preinstalled:
                missing.append(f"{wheel.name} needs {line}")
    return missing


def download(pins: list[str], dest: Path) -> None:
    """`pip download` exactly these pins (no dependencies) as cp312 manylinux x86_64 wheels into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
               *[arg for platform in PLATFORMS for arg in ("--platform", platform)], "-d", str(dest), *pins]
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    """Download the device wheels, print each and their total; exit 1 when over 64 MiB or incomplete."""
    parser = argparse.ArgumentParser(prog="python -m app.devicecheck.wheels", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="git-ignored folder for the wheels")
    args = parser.parse_args(argv)
    pins = plan(lock_pins())
    download(pins, args.dest)
    wanted = {normalize(pin.split("==")[0]) for pin in pins}
    # Only this plan's wheels count: an earlier plan's leftovers are removed.
    wheels = []
    for wheel in sorted(args.dest.glob("*.whl")):
        if normalize(wheel.name.split("-")[0]) in wanted:
            wheels.append(wheel)
        else:
            wheel.unlink()
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB  total, {len(wheels)} wheels in {args.dest} (limit 64 MiB with the working tree)")
    missing = unmet(wheels)
    for line in missing:
        print(f"unmet: {line}", file=sys.stderr)
    return 1 if missing or total > LIMIT_BYTES else 0


if __name__ == "__main__":
    raise SystemExit(main())
