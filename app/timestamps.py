"""UTC timestamps as the service writes them everywhere (ledger, jobs, work items, proofs): ISO 8601 with `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(moment: datetime, timespec: str = "microseconds") -> str:
    """A datetime as UTC ISO 8601 text ending in `Z` (microseconds by default); naive datetimes are UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def utc_now(timespec: str = "microseconds") -> str:
    """The current UTC time as `iso_utc` writes it."""
    return iso_utc(datetime.now(UTC), timespec)
