"""The project's one HTTP client (embedrl.models.http) and the reward models that use it, on loopback servers."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from embedrl.models.http import EndpointClient, EndpointError
from embedrl.rewards.judges import EndpointDiscriminator


@contextmanager
def loopback(reply: Callable[[dict], tuple[int, bytes]]) -> Iterator[tuple[str, list[dict]]]:
    """A threaded loopback server answering each POST with ``reply(body) -> (status, bytes)``; yields its base URL
    and the request bodies it received, with the ``Authorization`` header under ``_auth``."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({**body, "_auth": self.headers.get("Authorization"), "_path": self.path})
            status, data = reply(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def test_client_retries_5xx_with_exponential_backoff_then_succeeds() -> None:
    answers = iter([(503, b"busy"), (500, b"oops"), (200, b'{"ok": 1}')])
    delays: list[float] = []
    with loopback(lambda body: next(answers)) as (url, seen):
        client = EndpointClient(url, what="Embedder", token="t0k", retries=3, backoff_s=0.5, sleep=delays.append)
        assert client.post_json("/embeddings", {"x": 1}) == {"ok": 1}
    assert client.attempts == 3 and delays == [0.5, 1.0]
    assert [b["_path"] for b in seen] == ["/v1/embeddings"] * 3 and seen[0]["_auth"] == "Bearer t0k"


def test_client_raises_at_once_on_4xx_and_on_a_reply_that_is_not_json() -> None:
    with loopback(lambda body: (404, b'{"error": "model_not_found"}')) as (url, seen):
        client = EndpointClient(url, what="Discriminator", retries=3, sleep=lambda s: None)
        with pytest.raises(EndpointError, match=r"Discriminator endpoint .*/v1/chat answered HTTP 404: .*model_not_f"):
            client.post_json("/chat", {})
        assert client.attempts == 1 and len(seen) == 1 and seen[0]["_auth"] is None
    with loopback(lambda body: (200, b"<html>")) as (url, _), pytest.raises(EndpointError, match="not JSON"):
        EndpointClient(url, retries=3).post_json("/x", {})


def test_client_gives_up_after_its_retries_and_keeps_the_last_status() -> None:
    with loopback(lambda body: (502, b"bad gateway")) as (url, seen):
        client = EndpointClient(url, what="Embedder", retries=2, backoff_s=0.0)
        with pytest.raises(EndpointError, match=r"still failing after 2 retries \(HTTP 502: bad gateway\)") as err:
            client.post_json("/embeddings", {})
    assert err.value.status == 502 and len(seen) == 3


def test_client_rejects_bad_retry_settings() -> None:
    with pytest.raises(ValueError, match="max_backoff_s"):
        EndpointClient("http://x", backoff_s=2.0, max_backoff_s=1.0)


def test_endpoint_discriminator_keeps_prompt_order_and_raises_on_failure() -> None:
    def reply(body: dict) -> tuple[int, bytes]:
        prompt = body["messages"][0]["content"]
        if prompt == "fail":
            return 500, b"no"
        time.sleep(0.01 * (9 - int(prompt[1:])))  # later prompts are answered first
        return 200, json.dumps({"choices": [{"message": {"content": f"reply {prompt}"}}]}).encode()

    with loopback(reply) as (url, seen):
        disc = EndpointDiscriminator(url, "judge", max_new_tokens=5, concurrency=4, retries=1, backoff=0.0)
        assert disc([f"p{i}" for i in range(10)]) == [f"reply p{i}" for i in range(10)]
        assert seen[0]["model"] == "judge" and seen[0]["temperature"] == 0.0 and seen[0]["max_tokens"] == 5
        with pytest.raises(RuntimeError, match="HTTP 500"):
            disc(["fail"])
        assert sum(b["messages"][0]["content"] == "fail" for b in seen) == 2  # retried once, then raised
