"""The archive: signs each manifest, embeds it in the PNGs, stores files and ledger rows, verifies, prunes.

It owns the data dir's `keys/`, `images/` and `ledger.sqlite3` (or the PostgreSQL ledger named by
SAMESEED_DATABASE_URL). Disk and database work runs in worker threads (`asyncio.to_thread`), never
on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy

from app.errors import GenerationNotFound, ImageGone, StorageUnavailable
from app.provenance.c2pa import ContentCredentials, development_credentials, load_credentials
from app.provenance.manifest import Manifest, canonical_json
from app.provenance.png import embed_provenance
from app.provenance.signing import KeyRing, PublicKeyEntry, load_private_key
from app.provenance.verification import Verification, verify_manifest, verify_png
from app.settings import Settings
from app.store.files import ImageStore
from app.store.health import StorageHealth
from app.store.ledger import (
    GenerationQuery,
    GenerationRow,
    GenerationStatus,
    ImageRow,
    Ledger,
    LedgerError,
    SqliteLedger,
)
from app.timestamps import iso_utc

log = logging.getLogger("app.store.archive")

LEDGER_NAME = "ledger.sqlite3"
_PRUNE_BATCH = 200


def _npy(array: numpy.ndarray | None) -> bytes:
    """An array as .npy bytes (loadable with numpy.load, no pickle); empty for None."""
    if array is None:
        return b""
    buffer = io.BytesIO()
    numpy.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def open_ledger(settings: Settings) -> Ledger:
    """The ledger the settings name: PostgreSQL when SAMESEED_DATABASE_URL is set, else the data dir's SQLite file."""
    if settings.database_url is not None:
        from app.store.postgres import PostgresLedger  # psycopg is loaded only by servers that use it

        return PostgresLedger(settings.database_url.get_secret_value(), connect_timeout_s=settings.database_timeout_s)
    return SqliteLedger(settings.data_dir / LEDGER_NAME)


@dataclass(frozen=True)
class Archived:
    """A stored generation: the signed manifest and the PNGs with provenance embedded, in index order."""

    manifest: Manifest
    pngs: list[bytes]


@dataclass(frozen=True)
class PruneReport:
    """What one retention pass did."""

    generations: int
    bytes_freed: int


class Archive:
    """Provenance storage of one server: key ring, image store, ledger and retention."""

    def __init__(self, settings: Settings) -> None:
        self.data_dir = settings.data_dir
        self.key_file = settings.signing_key_file
        self.retention_days = settings.retention_days
        self.retention_max_bytes = (
            int(settings.retention_max_gb * 1e9) if settings.retention_max_gb is not None else None
        )
        self.retention_interval_s = settings.retention_interval_s
        if self.key_file is not None:
            load_private_key(self.key_file)  # fail fast at create_app, with a message naming the file
        self.c2pa_files = (settings.c2pa_cert_file, settings.c2pa_key_file)
        if settings.c2pa_cert_file is not None and settings.c2pa_key_file is not None:
            load_credentials(settings.c2pa_cert_file, settings.c2pa_key_file)  # fail fast, naming the file
        anchors = settings.c2pa_trust_anchors_file
        self.c2pa_trust_anchors = anchors.read_bytes() if anchors is not None else None
        self._c2pa: ContentCredentials | None = None
        self.store = ImageStore(self.data_dir / "images")
        self.ledger = open_ledger(settings)
        self.ledger.check()  # an unreachable database stops the start here, naming it (never a fallback)
        # the ledger's folder, then the images', then (a database) the ledger itself
        ping = self.ledger.ping if self.ledger.shared else None
        self.health = StorageHealth([self.data_dir, self.store.root], ping=ping)
        self._keys: KeyRing | None = None
        self._retention: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def keys(self) -> KeyRing:
        """The key ring (after start)."""
        if self._keys is None:
            raise RuntimeError("the archive is not started")
        return self._keys

    def open(self) -> None:
        """Open the key ring (generating a key once), the image store and the ledger (migrating it)."""
        self.store.root.mkdir(parents=True, exist_ok=True)
        self._keys = KeyRing.open(self.data_dir / "keys", self.key_file)
        cert_file, c2pa_key_file = self.c2pa_files
        if cert_file is not None and c2pa_key_file is not None:
            credentials = load_credentials(cert_file, c2pa_key_file)
        else:
            credentials = development_credentials(self.data_dir / "keys")
        self._c2pa = ContentCredentials(credentials)
        self._c2pa.check()  # a chain the C2PA SDK refuses stops the start, not the first image
        before = self.ledger.migrate()
        log.info(
            "archive open",
            extra={
                "signing_key_id": self._keys.signer.key_id,
                "c2pa_signer": self._c2pa.signer_name,
                "c2pa_development": credentials.development,
                "ledger": self.ledger.describe(),
                "ledger_schema_before": before,
            },
        )

    async def start(self) -> None:
        """Open everything (in a thread) and start the retention loop when retention is configured."""
        await asyncio.to_thread(self.open)
        if self.retention_days is not None or self.retention_max_bytes is not None:
            self._retention = asyncio.create_task(self._retention_loop(), name="retention")

    async def stop(self) -> None:
        """Stop the retention loop and close the ledger."""
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        self.ledger.close()

    # ------------------------------------------------------------------ recording
    def record(
        self, manifest: Manifest, pngs: Sequence[bytes], latents: Sequence[numpy.ndarray | None] = ()
    ) -> Archived:
        """Sign, embed, write the files (and latents) durably, then commit the ledger rows (blocking)."""
        if self._c2pa is None:
            raise RuntimeError("the archive is not started")
        signed = self.keys.signer.sign(manifest)
        document = signed.model_dump(mode="json")
        # The C2PA store goes in last: its hard binding covers every other byte, the iTXt manifest included.
        embedded = [
            self._c2pa.sign_png(embed_provenance(png, document, image.index), document, image.index)
            for png, image in zip(pngs, signed.images, strict=True)
        ]
        try:
            paths = self.store.write_generation(
                signed.id, canonical_json(document), embedded, [_npy(array) for array in latents]
            )
            self.ledger.record(
                GenerationRow(
                    id=signed.id,
                    received_at=signed.timestamps.received,
                    started_at=signed.timestamps.started,
                    finished_at=signed.timestamps.finished,
                    stored_at=iso_utc(datetime.now(UTC)),
                    model=signed.model.id,
                    reproducibility_key=signed.runtime.reproducibility_key,
                    num_images=len(signed.images),
                    manifest=canonical_json(document).decode("utf-8"),
                    key_id=self.keys.signer.key_id,
                    images=tuple(
                        ImageRow(
                            **image.hash_fields(),
                            generation_id=signed.id,
                            path=self.store.relative(path),
                            bytes=len(png),
                        )
                        for image, path, png in zip(signed.images, paths, embedded, strict=True)
                    ),
                )
            )
        except (OSError, LedgerError) as exc:
            self.store.delete_generation(signed.id)
            log.error("cannot store generation: %s", exc, extra={"generation_id": signed.id})
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.health.failed(reason)
            raise StorageUnavailable(f"the image store or ledger cannot be written ({reason})") from None
        return Archived(manifest=signed, pngs=embedded)

    # ------------------------------------------------------------------ reading
    def get(self, generation_id: str) -> GenerationRow:
        """One generation from the ledger; GenerationNotFound otherwise."""
        row = self.ledger.get(generation_id)
        if row is None:
            raise GenerationNotFound(f"no generation {generation_id!r} in the ledger", param="generation_id")
        return row

    def find(self, query: GenerationQuery, *, before_seq: int | None, limit: int) -> list[GenerationRow]:
        """Generations matching the query, newest first (see Ledger.find)."""
        return self.ledger.find(query, before_seq=before_seq, limit=limit)

    def image_bytes(self, generation_id: str, index: int) -> bytes:
        """The stored PNG of one image; GenerationNotFound or ImageGone (pruned or missing) otherwise."""
        row = self.get(generation_id)
        image = next((i for i in row.images if i.index == index), None)
        if image is None:
            raise GenerationNotFound(
                f"generation {generation_id} has images 0 to {row.num_images - 1}; got {index}", param="index"
            )
        if row.status is GenerationStatus.PRUNED:
            raise ImageGone(f"image {index} of {generation_id} was pruned at {row.pruned_at}; the manifest remains")
        try:
            return self.store.resolve(image.path).read_bytes()
        except FileNotFoundError:
            raise ImageGone(f"image {index} of {generation_id} is missing from the image store") from None

    def latents(self, generation_id: str, index: int) -> numpy.ndarray | None:
        """The stored final latents of one image (float32), or None when not kept or pruned."""
        path = self.store.latents_path(generation_id, index)
        try:
            return numpy.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError):
            return None

    def public_keys(self) -> list[PublicKeyEntry]:
        """Every public key that signed here, the active one first."""
        return self.keys.entries()

    # ------------------------------------------------------------------ verification
    def _consult_ledger(self, result: Verification) -> Verification:
        result.known_to_ledger = False
        if result.generation_id is None:
            return result
        row = self.ledger.get(result.generation_id)
        if row is None:
            result.reasons.append(f"this server's ledger has no generation {result.generation_id}")
        elif canonical_json(result.manifest) != row.manifest.encode("utf-8"):
            result.reasons.append("this server's ledger holds a different manifest under this id")
        else:
            result.known_to_ledger = True
        return result

    def verify_png(self, png: bytes) -> Verification:
        """Verify a PNG's embedded manifest and pixels, and look the generation up in the ledger."""
        return self._consult_ledger(verify_png(png, self.keys.public_keys, self.c2pa_trust_anchors))

    def verify_manifest(self, manifest: dict) -> Verification:
        """Verify a manifest's signature and look it up in the ledger."""
        return self._consult_ledger(verify_manifest(manifest, self.keys.public_keys))

    # ------------------------------------------------------------------ retention
    def prune(self, now: datetime | None = None) -> PruneReport:
        """Delete image files past SAMESEED_RETENTION_DAYS, then the oldest beyond SAMESEED_RETENTION_MAX_GB."""
        now = now or datetime.now(UTC)
        at = iso_utc(now)
        pruned = freed = 0

        def drop(rows: list[GenerationRow]) -> None:
            nonlocal pruned, freed
            for row in rows:  # files first: a crash in between leaves a row to prune again, never a lie
                self.store.delete_images(row.id)
                freed += sum(i.bytes for i in row.images)
            self.ledger.mark_pruned([row.id for row in rows], at)
            pruned += len(rows)

        if self.retention_days is not None:
            cutoff = iso_utc(now - timedelta(days=self.retention_days))
            while batch := self.ledger.oldest_stored(limit=_PRUNE_BATCH, received_before=cutoff):
                drop(batch)
        if self.retention_max_bytes is not None:
            over = self.ledger.stored_bytes() - self.retention_max_bytes
            while over > 0 and (batch := self.ledger.oldest_stored(limit=_PRUNE_BATCH)):
                chosen = []
                for row in batch:
                    if over <= 0:
                        break
                    chosen.append(row)
                    over -= sum(i.bytes for i in row.images)
                drop(chosen)
        if pruned:
            log.info("retention pruned %d generations, %d bytes", pruned, freed)
        return PruneReport(generations=pruned, bytes_freed=freed)

    async def _retention_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.prune)
            except Exception:  # a failed pass must not end retention; the next one retries
                log.exception("retention pass failed")
            await asyncio.sleep(self.retention_interval_s)

