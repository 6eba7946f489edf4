"""Anonymous access beyond loopback: a server that anyone on the network could use starts only when told so.

A server listening on a non-loopback address (SAMESEED_HOST) without SAMESEED_API_KEYS_FILE refuses to
start unless SAMESEED_ALLOW_ANONYMOUS=true; with that opt-out it starts and says so in its log and in
every /readyz answer.
"""

from __future__ import annotations

import ipaddress

from app.settings import Settings


def is_loopback(host: str) -> bool:
    """True if `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def anonymous_exposure(settings: Settings) -> str | None:
    """The warning for a server open to anonymous requests beyond loopback, or None; ValueError if not opted in."""
    if settings.api_keys_file is not None or is_loopback(settings.host):
        return None
    if not settings.allow_anonymous:
        raise ValueError(
            f"SAMESEED_HOST={settings.host} serves the network, but no SAMESEED_API_KEYS_FILE is set: anyone who "
            "reaches the port could generate. Set SAMESEED_API_KEYS_FILE (README \"API keys for a team server\"), "
            "or SAMESEED_ALLOW_ANONYMOUS=true to serve without keys"
        )
    return (
        f"anonymous access: listening on {settings.host} without SAMESEED_API_KEYS_FILE "
        "(SAMESEED_ALLOW_ANONYMOUS=true); anyone who reaches the port can generate"
    )
