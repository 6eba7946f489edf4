"""Co-batching proofs remembered across starts: one file per (reproducibility key, batch sizes, steps, code).

A proof renders each batch size co-batched and singly and compares every hash (app/pipeline/batched.py).
Its verdict is a function of the bits a worker computes, and the reproducibility key is the promise
that equal keys compute equal bits: the same model files, dtype, pipeline, torch and diffusers
versions, device, thread count and determinism settings. So a verdict proven under one key holds
for every later start under that key, as long as the co-batched code path is the same one; the
file's name hashes the key, the sizes, the proof steps and the source of that path. A restart on
the same machine then skips the proof (seconds per model on a GPU); any change of key or code
proves again. Each start's golden check still renders a co-batched case against its single-run
twin's baseline, so a broken promise would show as drift, not as silent co-batching.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.provenance.manifest import canonical_json
from app.store.files import write_atomic

log = logging.getLogger("app.worker")

# The modules whose code decides what a co-batched call and the single run it is judged against
# compute (a change to any of them proves again).
PROOF_CODE = ("app.pipeline.batched", "app.pipeline.batch_invariance", "app.pipeline.generate")


@functools.cache
def code_digest() -> str:
    """sha256 over the source of the PROOF_CODE modules, in that order."""
    digest = hashlib.sha256()
    for name in PROOF_CODE:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes() + b"\0")
    return digest.hexdigest()


def _depends_on(reproducibility_key: str, sizes: Sequence[int], steps: int) -> dict[str, Any]:
    return {"reproducibility_key": reproducibility_key, "sizes": sorted(sizes), "steps": steps, "code": code_digest()}


def proof_name(reproducibility_key: str, sizes: Sequence[int], steps: int) -> str:
    """The file name a proof is kept under: what it depends on, hashed."""
    return hashlib.sha256(canonical_json(_depends_on(reproducibility_key, sizes, steps))).hexdigest()[:32] + ".json"


class ProofStore:
    """Verdict lists in a folder (None: remember nothing); a missing or unreadable file is simply proven again."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def get(self, reproducibility_key: str, sizes: Sequence[int], steps: int) -> list[dict[str, Any]] | None:
        """The verdicts proven earlier under exactly this key, sizes, steps and code, or None."""
        if self.folder is None:
            return None
        path = self.folder / proof_name(reproducibility_key, sizes, steps)
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("co-batching proof %s unreadable (%s): proving again", path.name, exc)
            return None
        if document.get("reproducibility_key") != reproducibility_key or not isinstance(document.get("verdicts"), list):
            return None
        return [{**verdict, "cached": True} for verdict in document["verdicts"]]

    def put(self, reproducibility_key: str, sizes: Sequence[int], steps: int, verdicts: list[dict[str, Any]]) -> None:
        """Keep verdicts for the next start (written whole or not at all; a failure only costs a proof later).

        `verdicts` as proven: `get` marks them `cached` when it hands them back.
        """
        if self.folder is None:
            return
        document = {**_depends_on(reproducibility_key, sizes, steps), "verdicts": verdicts}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / proof_name(reproducibility_key, sizes, steps)
            write_atomic({path: json.dumps(document, indent=1).encode()})
        except OSError as exc:
            log.warning("co-batching proof not kept (%s): the next start proves again", exc)
