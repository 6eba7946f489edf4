"""Service settings: the one reader of the environment (prefix ``SAMESEED_``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.provenance.golden import EMBEDDED_SUITE

EMBEDDED_REGISTRY = Path(__file__).resolve().parent / "models" / "registry.yaml"
_WORKERS_PATTERN = re.compile(r"^(auto|cuda|cpu:[1-9][0-9]*)$")


class Settings(BaseSettings):
    """Every setting of a Sameseed server; each reads from ``SAMESEED_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="SAMESEED_", extra="ignore", frozen=True)

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
