"""A Sameseed server process for tests: started, settled (start-up golden checks done), and `generate` asserting 200."""

from __future__ import annotations

import time

from app.cli.server_process import ROOT, ServerProcess

__all__ = ["ROOT", "Server"]


class Server(ServerProcess):
    """A test server: `generate` asserts a 200 and returns the JSON body."""

    def start(self, wait_ready: bool = True, deadline_s: float = 180.0) -> Server:
        super().start(wait_ready=wait_ready, deadline_s=deadline_s)
        if wait_ready:
            self.settle()
        return self

    def settle(self, deadline_s: float = 60.0) -> None:
        """Wait until every worker finished its start-up golden check and is idle (tests then own it)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            workers = self.client.get("/readyz").json()["workers"]
            if all(w["consistency"] != "unchecked" and w["state"] == "ready" for w in workers):
                return
            time.sleep(0.05)
        raise AssertionError(f"start-up golden checks did not finish: {workers}")

    def generate(self, **body):
        response = self.post(**body)
        assert response.status_code == 200, response.text
        return response.json()
