"""The app with only requirements.lock's distributions importable (torch and diffusers imported for real)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.locks import ROOT, runtime_pins

# A fresh interpreter that cannot import any module only the dev lock (or pip itself) brings: the image's view.
_RUNTIME_ONLY_PROBE = """
import importlib.abc, importlib.metadata, json, sys
from packaging.utils import canonicalize_name
pins = set(json.loads(sys.argv[1]))
owners = importlib.metadata.packages_distributions()
blocked = {module for module, dists in owners.items() if not {canonicalize_name(d) for d in dists} & pins}
class RuntimeOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"{fullname} is not in requirements.lock", name=fullname)
        return None
sys.meta_path.insert(0, RuntimeOnly())
for name in [m for m in sys.modules if m.partition(".")[0] in blocked]:
    del sys.modules[name]
import app.cli.commands, app.main, app.pipeline.loader, app.models.hub, app.worker.process
import torch, diffusers, transformers, safetensors, huggingface_hub
try:
    import pip
except ModuleNotFoundError:
    print("ok")
"""


def test_the_app_imports_with_only_the_runtime_locks_distributions():
    """The entry modules import where only requirements.lock is installed (nothing from the dev lock, no pip);
    the container test installs that lock alone into the image for real."""
    imported = subprocess.run([sys.executable, "-c", _RUNTIME_ONLY_PROBE, json.dumps(sorted(runtime_pins()))],
                              cwd=ROOT, capture_output=True, text=True)
    assert imported.stdout.strip() == "ok", imported.stderr[-3000:]


