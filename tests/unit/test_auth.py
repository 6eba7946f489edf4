"""API keys: the keys file format, constant-time checks, 401 with the error body, open health routes."""

import hashlib
import logging

import pytest
from fastapi.testclient import TestClient

from app.api.auth import ApiKeys
from app.main import create_app
from app.settings import Settings
from tests.support.fakes import answering_app

PLAIN = "team-a-0123456789abcdef"
HASHED = "team-b-fedcba9876543210"


@pytest.fixture()
def keys_file(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(f"# team keys\n{PLAIN}\n\nsha256:{hashlib.sha256(HASHED.encode()).hexdigest()}\n")
    return path


@pytest.fixture()
def client(tmp_path, keys_file):
    settings = Settings(data_dir=tmp_path / "data", workers="cpu:1", api_keys_file=keys_file)
    application = answering_app(settings)
    with TestClient(application) as test_client:
        yield test_client


def test_plain_and_hashed_keys_are_accepted_and_nothing_else(keys_file):
    keys = ApiKeys.load(keys_file)
    assert len(keys) == 2
    assert keys.allows(PLAIN) and keys.allows(HASHED)
    assert not keys.allows(PLAIN + "x") and not keys.allows("") and not keys.allows(f"sha256:{HASHED}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        ("short\n", "line 1: a key needs at least 16"),
        ("ok-key-0123456789abc\nsha256:abc\n", "line 2: a hashed key"),
        ("has space 0123456789\n", "line 1: a key cannot contain whitespace"),
    ],
)
def test_malformed_keys_files_name_the_line_never_the_key(text, message):
    with pytest.raises(ValueError, match=message) as info:
        ApiKeys.parse(text)
    assert "0123456789" not in str(info.value)


def test_requests_without_a_valid_key_get_401_with_the_error_body(client):
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": f"Basic {PLAIN}"}):
        response = client.post("/v1/generations", json={"prompt": "a cat"}, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
        assert PLAIN not in response.text
    for path in ("/v1/generations", "/v1/keys", "/v1/models", "/docs", "/openapi.json", "/v1/nothing"):
        assert client.get(path).status_code == 401, path


def test_a_valid_key_passes_and_health_stays_open(client, caplog):
    caplog.set_level(logging.DEBUG)
    for key in (PLAIN, HASHED):
        response = client.post(
            "/v1/generations", json={"prompt": "a cat"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
        url = response.json()["images"][0]["url"]
        assert client.get(url, headers={"Authorization": f"bearer {key}"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200, path
    assert PLAIN not in caplog.text and HASHED not in caplog.text


def test_an_unusable_keys_file_stops_the_start(tmp_path):
    path = tmp_path / "keys"
    path.write_text("tiny\n")
    with pytest.raises(ValueError, match="line 1"):
        create_app(Settings(data_dir=tmp_path, workers="cpu:1", api_keys_file=path))


def test_an_admin_line_marks_a_plain_or_hashed_key_as_admin():
    root = "root-key-0123456789a"
    keys = ApiKeys.parse(f"admin sha256:{hashlib.sha256(root.encode()).hexdigest()}\nplain-key-0123456789\n")
    assert keys.allows(root) and keys.is_admin(root)
    assert keys.allows("plain-key-0123456789") and not keys.is_admin("plain-key-0123456789")
    assert not keys.allows("admin") and not keys.is_admin("admin")
