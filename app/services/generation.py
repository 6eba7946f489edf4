"""Generate, then sign, embed and store: the one path every generation front door calls."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from app.archive import Archive, Archived
from app.dispatcher import Disconnected, Dispatcher, utc_now
from app.provenance.hashes import latents_from_bytes
from app.provenance.manifest import ManifestWarning
from app.schemas import GenerationRequest


async def generate_and_store(
    request: GenerationRequest,
    *,
    dispatcher: Dispatcher,
    archive: Archive,
    disconnected: Disconnected | None = None,
    notes: Sequence[ManifestWarning] = (),
) -> Archived:
    """Run `request` to completion and store it durably; `notes` are appended to the manifest's warnings."""
    received = utc_now()
    outcome = await dispatcher.generate(request, received_at=received, disconnected=disconnected)
    manifest = outcome.manifest
    if notes:  # recorded before signing: what a front door accepted without effect is part of the proof
        manifest = manifest.model_copy(update={"warnings": [*manifest.warnings, *notes]})
    # Files and ledger rows are durable before the answer leaves: a 200 survives SIGKILL.
    return await asyncio.to_thread(
        archive.record,
        manifest,
        [image.png for image in outcome.images],
        [latents_from_bytes(image.latents, image.latent_shape) for image in outcome.images],
    )
