"""Slow and greedy clients against the real HTTP server (uvicorn on loopback, fake workers): others stay served."""

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from app.cli.connections import ConnectionLimits
from app.cli.serve import server_config
from app.cli.server_process import free_port
from app.settings import Settings
from tests.support.fakes import answering_app

DEADLINE_S = 0.5


def wait_for(predicate, deadline_s=10.0, what="condition"):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def serve(tmp_path):
    """Start the app under uvicorn with the given connection limits in a thread; stopped at teardown."""
    started = []

    def start(limits):
        application = answering_app(Settings(data_dir=tmp_path, workers="cpu:1"))
        server = uvicorn.Server(server_config(application, host="127.0.0.1", port=free_port(), limits=limits))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        wait_for(lambda: server.started, what="the server to start")
        return server, server.config.port

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(timeout=15)


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_all(sock):
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    return status, headers, json.loads(body)


def test_slowloris_headers_time_out_while_other_clients_are_served(serve):
    _, port = serve(ConnectionLimits(header_timeout_s=DEADLINE_S, body_timeout_s=DEADLINE_S))
    slow = [connect(port) for _ in range(100)]
    for sock in slow:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: sameseed\r\nX-Slow: ")  # and never the rest
    began = time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        for _ in range(5):  # served at once, slow connections or not
            assert client.get("/healthz").status_code == 200
    assert time.monotonic() - began < DEADLINE_S
    for sock in slow:
        status, headers, body = parse(read_all(sock))  # read_all returns: the server closed the connection
        assert status == 408 and headers[b"connection"] == b"close"
        assert body["error"]["type"] == "request_timeout" and "headers" in body["error"]["message"]
        sock.close()
    assert time.monotonic() - began < DEADLINE_S + 5


def test_slow_body_times_out_with_408(serve):
    _, port = serve(ConnectionLimits(header_timeout_s=DEADLINE_S, body_timeout_s=DEADLINE_S))
    with connect(port) as sock:
        sock.sendall(
            b"POST /v1/generations HTTP/1.1\r\nHost: sameseed\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n{\"prompt\": "
        )
        began = time.monotonic()
        status, _, body = parse(read_all(sock))
    assert status == 408 and body["error"]["type"] == "request_timeout" and "body" in body["error"]["message"]
    assert time.monotonic() - began < DEADLINE_S + 5


def test_a_keep_alive_connection_gets_a_fresh_header_deadline_and_a_long_answer_is_not_cut(serve):
    server, port = serve(ConnectionLimits(header_timeout_s=DEADLINE_S, body_timeout_s=DEADLINE_S))
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        for _ in range(3):  # each request on the same connection, spaced by less than the deadline
            assert client.get("/healthz").status_code == 200
            time.sleep(DEADLINE_S / 2)
        assert len(server.server_state.connections) == 1


def test_connections_past_the_cap_get_503_and_others_are_served_again_once_one_closes(serve):
    server, port = serve(ConnectionLimits(header_timeout_s=30, max_connections=3))
    held = [connect(port) for _ in range(3)]
    wait_for(lambda: len(server.server_state.connections) == 3, what="3 open connections")
    with connect(port) as extra:
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: sameseed\r\n\r\n")
        status, headers, body = parse(read_all(extra))
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert body["error"]["type"] == "too_many_connections" and "3 connections" in body["error"]["message"]
    held.pop().close()
    wait_for(lambda: len(server.server_state.connections) == 2, what="a connection to close")
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    for sock in held:
        sock.close()


def test_an_oversized_header_section_gets_the_json_error_body(serve):
    _, port = serve(ConnectionLimits())
    with connect(port) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: sameseed\r\nAuthorization: Bearer " + b"a" * 20_000)
        status, headers, body = parse(read_all(sock))
    assert status == 400 and headers[b"content-type"] == b"application/json"
    assert body["error"]["type"] == "malformed_request" and "16 KiB" in body["error"]["message"]


def test_garbage_instead_of_http_gets_the_json_error_body(serve):
    _, port = serve(ConnectionLimits())
    with connect(port) as sock:
        sock.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        status, _, body = parse(read_all(sock))
    assert status == 400 and body["error"]["message"] == "the request is not valid HTTP/1.1"
