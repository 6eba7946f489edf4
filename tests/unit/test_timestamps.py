"""The one way the service writes UTC timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from app.timestamps import iso_utc, utc_now


def test_naive_and_offset_datetimes_are_written_in_utc_with_z():
    assert iso_utc(datetime(2026, 11, 27, 14, 5, 6, 789)) == "2026-11-27T14:05:06.000789Z"
    plus_two = datetime(2026, 11, 27, 16, 5, 6, tzinfo=timezone(timedelta(hours=2)))
    assert iso_utc(plus_two, "seconds") == "2026-11-27T14:05:06Z"


def test_now_is_current_and_sorts_as_text():
    before = iso_utc(datetime.now(UTC))
    now = utc_now()
    assert before <= now and now.endswith("Z") and len(now) == len("2026-11-27T14:05:06.000789Z")
    assert utc_now("seconds").endswith("Z") and "." not in utc_now("seconds")
