"""API keys: `Authorization: Bearer <key>` on every route but health and metrics, when a keys file is set.

Keys are kept only as sha256 digests and compared in constant time; no key, digest or header is
ever logged or echoed back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.exposure import anonymous_exposure
from app.api.openai_images import OPENAI_PATH_PREFIX, openai_error_response
from app.errors import Unauthorized
from app.settings import Settings

log = logging.getLogger("app.auth")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MIN_KEY_LENGTH = 16
_HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


class ApiKeys:
    """The sha256 digests of the accepted API keys."""

    def __init__(self, digests: list[bytes], admins: list[bytes] | None = None) -> None:
        if not digests:
            raise ValueError("an API keys list needs at least one key")
        self._digests = tuple(digests)
        self._admins = tuple(admins or ())  # a subset of digests: these keys see every client's jobs

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def parse(cls, text: str, source: str = "the API keys file") -> ApiKeys:
        """Read keys, one a line: a plain key, or `sha256:<64 hex>` of one, either after `admin ` for a key
        that sees every client's jobs; `#` starts a comment line."""
        digests: list[bytes] = []
        admins: list[bytes] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            admin = line.startswith("admin ")
            if admin:
                line = line.removeprefix("admin ").strip()
            hashed = _HASHED.match(line)
            if hashed:
                digests.append(bytes.fromhex(hashed.group(1)))
            elif line.startswith("sha256:"):
                raise ValueError(f"{source} line {number}: a hashed key is sha256: and 64 hex digits")
            elif any(c.isspace() for c in line):
                raise ValueError(f"{source} line {number}: a key cannot contain whitespace")
            elif len(line) < MIN_KEY_LENGTH:
                raise ValueError(f"{source} line {number}: a key needs at least {MIN_KEY_LENGTH} characters")
            else:
                digests.append(hashlib.sha256(line.encode("utf-8")).digest())
            if admin:
                admins.append(digests[-1])
        if not digests:
            raise ValueError(f"{source} holds no key; add one or unset SAMESEED_API_KEYS_FILE")
        return cls(digests, admins)

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        """Read the keys file; ValueError (naming the line, never the key) when it is malformed."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        return cls.parse(text, source=str(path))

    def is_admin(self, key: str) -> bool:
        """True if `key` is an admin key (compared in constant time, as `allows`)."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found = False
        for admin in self._admins:
            found |= hmac.compare_digest(digest, admin)
        return found

    def allows(self, key: str) -> bool:
        """True if `key` is one of the keys; every digest is compared, in constant time."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found = False
        for accepted in self._digests:
            found |= hmac.compare_digest(digest, accepted)
        return found


class ApiKeyMiddleware:
    """Pure ASGI middleware answering 401 with the error body unless the bearer key is accepted."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass open paths and authorized requests through; answer 401 otherwise."""
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key.strip() and self.keys.allows(key.strip()):
            # jobs belong to the key that made them: routes read this digest (never the key) as the owner
            state = scope.setdefault("state", {})
            state["api_key_owner"] = hashlib.sha256(key.strip().encode("utf-8")).hexdigest()
            state["api_key_admin"] = self.keys.is_admin(key.strip())
            await self.app(scope, receive, send)
            return
        error = Unauthorized(
            "this server requires an API key: send `Authorization: Bearer <key>`"
            if not scheme
            else "the API key is not valid",
        )
        if scope["path"].startswith(OPENAI_PATH_PREFIX):  # the OpenAI SDK's routes answer in OpenAI's shape
            await openai_error_response(error)(scope, receive, send)
            return
        await JSONResponse(error.body(), status_code=error.status, headers=error.headers())(scope, receive, send)


def install_api_keys(app: FastAPI, settings: Settings) -> None:
    """Require API keys when SAMESEED_API_KEYS_FILE is set; beyond loopback without keys, start only if opted out.

    ValueError when an anonymous server would listen beyond loopback without SAMESEED_ALLOW_ANONYMOUS;
    with it, the warning is logged and kept in app.state.warnings (shown by /readyz).
    """
    app.state.warnings = []
    if settings.api_keys_file is None:
        warning = anonymous_exposure(settings)
        if warning is not None:
            log.warning(warning)
            app.state.warnings.append(warning)
        return
    keys = ApiKeys.load(settings.api_keys_file)
    app.add_middleware(ApiKeyMiddleware, keys=keys)
    log.info("API keys required (%d accepted keys)", len(keys))
