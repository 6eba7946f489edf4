"""The image's identity in the real runtime fingerprint: recorded in the manifest, kept out of the key."""

from __future__ import annotations

from app.provenance.key import KEY_RUNTIME_FIELDS, reproducibility_key
from app.settings import Settings
from tests.support.fakes import RUNTIME


def test_image_identity_reaches_the_manifest_but_not_the_key():
    from app.pipeline.determinism import runtime_fingerprint
    from app.provenance.manifest import ManifestRuntime

    identity = Settings(image_version="1.2.3", image_revision="abc123", image_base="nvidia/cuda:x").image_identity()
    assert identity == {"version": "1.2.3", "revision": "abc123", "base": "nvidia/cuda:x"}
    assert Settings().image_identity() is None  # outside an image
    assert runtime_fingerprint("cpu", "w0", image=identity)["image"] == identity
    assert "image" not in KEY_RUNTIME_FIELDS
    keyed = {"files": {"a": "0" * 64}, "pipeline": "StableDiffusionPipeline", "dtype": "float32"}
    assert reproducibility_key(**keyed, runtime={**RUNTIME, "image": identity}) == reproducibility_key(
        **keyed, runtime={**RUNTIME, "image": None}
    )
    runtime = {**RUNTIME, "worker_id": "w0", "reproducibility_key": "rk1-x", "key_fields": [], "image": identity}
    assert ManifestRuntime(**runtime).model_dump()["image"] == identity


def test_the_runtime_a_worker_reports_unpickles_without_torch():
    """The server process reads each worker's fingerprint from a pipe: plain data, so it never imports torch."""
    import pickle
    import subprocess
    import sys

    from app.pipeline.determinism import runtime_fingerprint

    fingerprint = runtime_fingerprint("cpu", "w0")
    check = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], input=pickle.dumps(fingerprint), capture_output=True,
                          timeout=60, check=True)
    assert done.stdout.decode().strip() == "False"
    assert type(fingerprint["versions"]["torch"]) is str
