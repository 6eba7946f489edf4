"""A team server with API keys: 401 without a key, 200 with one, health and metrics stay open."""

from __future__ import annotations

KEY = "team-key-5d1c0f3e9a7b4c21"


def test_api_keys_guard_everything_but_health(make_server, tmp_path):
    keys = tmp_path / "api_keys"
    keys.write_text(f"{KEY}\n")
    server = make_server("keys", SAMESEED_API_KEYS_FILE=str(keys)).start()  # /readyz answers without a key
    client = server.client
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200, path

    denied = client.post("/v1/generations", json={"prompt": "a cat", "seed": 1})
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "unauthorized"
    assert client.get("/v1/keys").status_code == 401

    auth = {"Authorization": f"Bearer {KEY}"}
    body = client.post("/v1/generations", json={"prompt": "a cat", "seed": 1, "response_format": "url"}, headers=auth)
    assert body.status_code == 200, body.text
    url = body.json()["images"][0]["url"]
    assert client.get(url).status_code == 401
    assert client.get(url, headers=auth).status_code == 200
    server.stop()
    assert KEY not in server.logs()
