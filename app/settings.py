"""Service settings: the one reader of the environment (prefix ``SAMESEED_``)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.provenance.golden import EMBEDDED_SUITE

EMBEDDED_REGISTRY = Path(__file__).resolve().parent / "models" / "registry.yaml"
_WORKERS_PATTERN = re.compile(r"^(auto|cuda|cpu:[1-9][0-9]*)$")


class Settings(BaseSettings):
    """Every setting of a Sameseed server; each reads from ``SAMESEED_<NAME>``."""

    # hide_input_in_errors: a bad SAMESEED_DATABASE_URL may hold a password; errors never echo values
    model_config = SettingsConfigDict(env_prefix="SAMESEED_", extra="ignore", frozen=True, hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    data_dir: Path = Path(".sameseed")
    workers: str = Field(
        default="auto",
        description="auto (one worker per GPU, else one CPU worker), cuda (one per GPU), or cpu:N.",
    )
    ray_address: str | None = Field(
        default=None,
        description="A Ray cluster (host:port of its head): workers are Ray Serve replicas there (`serve --ray`).",
    )
    cpu_threads: Annotated[int, Field(ge=1, le=256)] = 1
    cpu_mkldnn: bool = Field(
        default=True,
        description="Use oneDNN on CPU; off gives bitwise equality across thread counts 1/2/4/8.",
    )
    max_queue: Annotated[int, Field(ge=1, le=100_000)] = 64
    models: Path = EMBEDDED_REGISTRY
    default_model: str | None = Field(
        default=None, description="Registry id used when a request names no model."
    )
    job_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    drain_s: Annotated[float, Field(ge=0)] = Field(
        default=60.0, description="On SIGTERM: seconds admitted jobs get to finish before exit."
    )
    worker_start_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    header_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=10.0, description="A client sends a request's headers within this, else 408 and the connection closes."
    )
    body_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=60.0, description="A client sends a request's whole body within this after its headers, else 408."
    )
    max_connections: Annotated[int, Field(ge=1)] = Field(
        default=1024, description="Open client connections; one more is answered 503 too_many_connections."
    )
    ready_requires_consistency: bool = Field(
        default=True,
        description="A worker takes user work only once its start-up golden check is consistent or made a baseline.",
    )
    max_batch: Annotated[int, Field(ge=1, le=16)] = Field(
        default=4,
        description="Images per co-batched pipeline call (1: every image alone). A worker proves each size 2..N "
        "at start and co-batches only the (model, shape, size) whose images equal their single runs bitwise.",
    )
    batch_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = Field(
        default=25.0,
        description="The longest a user image waits for compatible company while other work runs (an idle server "
        "starts a lone image at once).",
    )
    batch_proof_steps: Annotated[int, Field(ge=1, le=150)] = Field(
        default=2, description="Denoising steps of each image of the start-up co-batching proof."
    )
    batch_proof_dir: Path | None = Field(
        default=None,
        description="Where workers keep their co-batching proofs, one file per reproducibility key, batch sizes, "
        "proof steps and co-batching code: a later start under the same ones reuses the verdicts instead of "
        "proving again. Absent: <data dir>/cobatch-proofs. Empty the folder to prove afresh.",
    )
    allow_download: bool = False
    log_level: str = "info"
    consistency_interval_s: Annotated[float, Field(ge=0)] = Field(
        default=3600.0, description="Seconds between golden-suite runs per worker; 0: only at start and on demand."
    )
    quarantine_on_drift: bool = Field(
        default=True, description="Take a drifted worker out of rotation while a consistent peer serves its group."
    )
    golden_suite: Path = Field(default=EMBEDDED_SUITE, description="The golden suite YAML file.")
    signing_key_file: Path | None = Field(
        default=None, description="Ed25519 private key (PEM) signing manifests; absent: one made in the data dir."
    )
    api_keys_file: Path | None = Field(
        default=None, description="API keys, one per line (plain or sha256:<hex>); set: Bearer auth required."
    )
    c2pa_cert_file: Path | None = Field(
        default=None,
        description="C2PA signing certificate chain (PEM, signing certificate first); with c2pa_key_file. "
        "Absent: a development CA and signer made once in the data dir (untrusted by C2PA tools).",
    )
    c2pa_key_file: Path | None = Field(default=None, description="The C2PA signing certificate's private key (PEM).")
    c2pa_trust_anchors_file: Path | None = Field(
        default=None, description="CA certificates (PEM) whose C2PA signers POST /v1/verify reports as trusted."
    )
    allow_anonymous: bool = Field(
        default=False,
        description="Serve without API keys on a non-loopback SAMESEED_HOST (a warning in the log and /readyz).",
    )
    retention_days: Annotated[float | None, Field(gt=0)] = Field(
        default=None, description="Prune image files older than this; ledger rows stay. Absent: keep forever."
    )
    retention_max_gb: Annotated[float | None, Field(gt=0)] = Field(
        default=None, description="Prune the oldest image files while the store exceeds this size."
    )
    retention_interval_s: Annotated[float, Field(gt=0)] = 600.0
    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:port/dbname: the ledger and golden baselines in PostgreSQL, "
        "shared by every server given the same URL. Absent: the SQLite file ledger.sqlite3 in the data dir.",
    )
    database_timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=5.0,
        description="Seconds to connect to the PostgreSQL ledger, and that a request waits for a connection "
        "before it is answered 503 storage_unavailable.",
    )
    node_id: str | None = Field(
        default=None,
        description="This server's name in a shared ledger (its jobs are recovered by it after a restart); "
        "absent: <hostname>:<port>.",
    )
    image_version: str | None = Field(
        default=None, description="Set by the container image: its version label. Recorded as runtime.image."
    )
    image_revision: str | None = Field(default=None, description="Set by the image: the source revision it holds.")
    image_base: str | None = Field(default=None, description="Set by the image: the base image it was built on.")

    def image_identity(self) -> dict[str, str] | None:
        """The container image this server runs from (a manifest's runtime.image); None outside an image."""
        if self.image_version is None:
            return None
        return {
            "version": self.image_version,
            "revision": self.image_revision or "unknown",
            "base": self.image_base or "unknown",
        }

    def node_name(self) -> str:
        """This server's name in a shared ledger: SAMESEED_NODE_ID, else `<hostname>:<port>` (kept across restarts)."""
        return self.node_id or f"{socket.gethostname()}:{self.port}"

    @field_validator("database_url", "node_id", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(r"^postgres(ql)?://", value.get_secret_value()):
            raise ValueError("SAMESEED_DATABASE_URL must be a postgresql:// URL (the value is not shown)")
        return value

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, value: str) -> str:
        value = value.strip().lower()
        if not _WORKERS_PATTERN.match(value):
            raise ValueError(
                f"SAMESEED_WORKERS must be auto, cuda or cpu:N with N >= 1; got {value!r}"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError(f"SAMESEED_LOG_LEVEL must be a logging level name; got {value!r}")
        return value

    @field_validator(
        "signing_key_file",
        "api_keys_file",
        "c2pa_cert_file",
        "c2pa_key_file",
        "c2pa_trust_anchors_file",
        "retention_days",
        "retention_max_gb",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # compose files pass `VAR=` for "not set"
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("signing_key_file", "api_keys_file", "c2pa_cert_file", "c2pa_key_file", "c2pa_trust_anchors_file")
    @classmethod
    def _check_secret_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"names no readable file: {value}")
        return value.resolve() if value is not None else None

    @model_validator(mode="after")
    def _c2pa_cert_and_key_together(self) -> Settings:
        if (self.c2pa_cert_file is None) != (self.c2pa_key_file is None):
            raise ValueError("SAMESEED_C2PA_CERT_FILE and SAMESEED_C2PA_KEY_FILE are set together or not at all")
        return self

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"SAMESEED_MODELS names no readable registry file: {value}")
        return value.resolve()
