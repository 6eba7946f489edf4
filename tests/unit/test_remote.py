"""The CLI's HTTP client: retries of 429/503 after Retry-After, typed answers, errors named."""

import httpx
import pytest

from app.cli.client import RemoteError, SameseedClient


def scripted(*answers):
    """A transport answering each request with the next (status, headers) and recording the paths."""
    seen = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        status, headers = answers[min(len(seen), len(answers)) - 1]
        if status == 200:
            return httpx.Response(200, json={"status": "ok", "version": "9.9"})
        return httpx.Response(status, headers=headers, json={"error": {"type": "queue_full", "message": "busy"}})

    return httpx.MockTransport(handle), seen


def test_429_and_503_are_retried_after_retry_after_or_backoff():
    transport, seen = scripted((429, {"Retry-After": "3"}), (503, {}), (503, {}), (200, {}))
    slept = []
    client = SameseedClient("http://server", transport=transport, sleep=slept.append)
    assert client.call("POST", "/v1/consistency/run") == {"status": "ok", "version": "9.9"}
    assert slept == [3.0, 2.0, 4.0] and len(seen) == 4


def test_retries_stop_after_the_budget_with_the_servers_message():
    transport, seen = scripted((429, {"Retry-After": "1"}))
    client = SameseedClient("http://server", transport=transport, sleep=lambda s: None, retries=2)
    with pytest.raises(RemoteError) as caught:
        client.call("GET", "/v1/consistency")
    assert caught.value.status == 429 and "queue_full: busy" in str(caught.value) and len(seen) == 3


def test_a_huge_retry_after_is_capped():
    transport, _ = scripted((429, {"Retry-After": "100000"}), (200, {}))
    slept = []
    SameseedClient("http://server", transport=transport, sleep=slept.append).call("GET", "/x")
    assert slept == [120.0]


def test_health_is_typed_and_never_retried():
    transport, seen = scripted((200, {}))
    assert SameseedClient("http://server", transport=transport).health().version == "9.9"
    transport, seen = scripted((503, {"Retry-After": "1"}), (200, {}))
    with pytest.raises(RemoteError):
        SameseedClient("http://server", transport=transport, sleep=lambda s: None).health()
    assert seen == ["/healthz"]


def test_the_api_key_is_sent_as_a_bearer_token(monkeypatch):
    headers = []

    def handle(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("authorization"))
        return httpx.Response(200, json={})

    transport = httpx.MockTransport(handle)
    monkeypatch.setenv("SAMESEED_API_KEY", "from-the-environment")
    SameseedClient("http://server", transport=transport).call("GET", "/v1/models")
    SameseedClient("http://server", api_key="given", transport=transport).call("GET", "/v1/models")
    assert headers == ["Bearer from-the-environment", "Bearer given"]
