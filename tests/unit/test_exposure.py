"""Anonymous access beyond loopback: refused at start unless opted out; the opt-out shows in the log and /readyz."""

import logging

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.support.fakes import FakePool


def make(tmp_path, **overrides):
    settings = Settings(data_dir=tmp_path, workers="cpu:1", **overrides)
    return create_app(settings, pool_factory=lambda *args: FakePool(*args, auto=True))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "sameseed.example"])
def test_an_anonymous_server_beyond_loopback_refuses_to_start(tmp_path, host):
    with pytest.raises(ValueError, match="SAMESEED_ALLOW_ANONYMOUS=true") as refused:
        make(tmp_path, host=host)
    assert "SAMESEED_API_KEYS_FILE" in str(refused.value)


def test_the_opt_out_starts_it_with_a_warning_in_the_log_and_in_readyz(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="app.auth"):
        application = make(tmp_path, host="0.0.0.0", allow_anonymous=True)
    assert any("anonymous access" in record.getMessage() for record in caplog.records)
    with TestClient(application) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        (warning,) = ready.json()["warnings"]
        assert "anonymous access" in warning and "0.0.0.0" in warning
        assert client.post("/v1/generations", json={"prompt": "a cat"}).status_code == 200  # served, as opted


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_and_keyed_servers_need_no_opt_out_and_warn_nothing(tmp_path, host):
    keys = tmp_path / "api_keys"
    keys.write_text("a-long-enough-test-key\n")
    for application in (make(tmp_path, host=host), make(tmp_path, host="0.0.0.0", api_keys_file=keys)):
        with TestClient(application) as client:
            assert client.get("/readyz").json()["warnings"] == []
