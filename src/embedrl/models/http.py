"""The project's one HTTP client for models behind an endpoint: :class:`EndpointClient` (``httpx``).

Every caller of a served model uses it: the EG-RL reward models (:mod:`embedrl.rewards.judges`:
``EndpointEmbedderReward``, ``EndpointDiscriminator``) and the annotator (:mod:`embedrl.prep.annotate`:
``OpenAIAnnotator``). It POSTs JSON to ``base_url + path`` and returns the parsed reply, with

- a bearer token when one is given;
- a deadline on the **whole** reply (connect, send, headers and body together), not on each read: an endpoint that
  trickles bytes is cut off at ``timeout_s`` (its socket is shut down, which wakes the blocked read) and the attempt
  counts as a network error. Each request opens its own connection, so the deadline has a socket to act on;
- retries of network errors (refused connection, timeout, cut reply) and of the statuses in :data:`RETRY_STATUS`
  (408, 409, 429, 5xx but 501) with exponential back-off ``backoff_s · 2^(k−1)``, at most ``max_backoff_s``;
  ``httpx.HTTPTransport(retries=N)`` alone would retry failed connections only;
- an :class:`EndpointError` at once on any other status (a client error does not heal by retrying), on a reply that
  is not JSON, or once the retries are spent. A failure is never replaced by a default reply.

The client is thread-safe: callers run concurrent requests from a thread pool.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["RETRY_STATUS", "EndpointClient", "EndpointError"]

logger = logging.getLogger(__name__)

# Statuses that may heal on a retry: timeout, conflict, rate limit, and the server errors but 501 (not implemented).
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """A request that failed for good: a status that is not retried, a reply that is not JSON, or a request still
    failing after its retries. ``status`` is the last HTTP status (None for a network error)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EndpointClient:
    """POST JSON to one endpoint, with a whole-reply deadline and retries (module docstring).

    Args:
        base_url: the endpoint's base URL, e.g. ``http://host:8000/v1``; paths are appended to it.
        what: what the endpoint serves, for messages (``"Embedder"``, ``"Discriminator"``, ``"annotator"``).
        token: bearer token; ``""`` sends no ``Authorization`` header.
        timeout_s: seconds for one whole reply.
        retries: retries after the first attempt (0 = one attempt).
        backoff_s, max_backoff_s: the first retry's delay, doubled per retry, capped at ``max_backoff_s``.
        sleep: the delay function (tests record the delays instead of waiting).

    ``attempts`` counts the requests sent, retries included.
    """

    def __init__(
        self, base_url: str, *, what: str = "model", token: str = "", timeout_s: float = 120.0, retries: int = 2,
        backoff_s: float = 1.0, max_backoff_s: float = 60.0, sleep: Callable[[float], Any] = time.sleep,
    ) -> None:  # fmt: skip
        if retries < 0 or backoff_s < 0 or max_backoff_s < backoff_s or timeout_s <= 0:
            raise ValueError(
                f"need retries >= 0, 0 <= backoff_s <= max_backoff_s and timeout_s > 0; got retries={retries}, "
                f"backoff_s={backoff_s}, max_backoff_s={max_backoff_s}, timeout_s={timeout_s}"
            )
        self.base_url, self.what = base_url.rstrip("/"), what
        self.timeout_s, self.retries, self.backoff_s, self.max_backoff_s = timeout_s, retries, backoff_s, max_backoff_s
        self.sleep = sleep
        self.attempts = 0
        self._lock = threading.Lock()
        self.client = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=timeout_s,
            limits=httpx.Limits(max_keepalive_connections=0),  # a new connection (and socket) per request
        )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``base_url + path`` and return the JSON reply (retried as the module docstring says).

        Raises:
            EndpointError: the endpoint answered a status that is not retried, sent a reply that is not JSON, or
                still failed after ``retries`` retries; the message names the URL and the last failure.
        """
        url = self.base_url + path
        last, status = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.delay(attempt))
            with self._lock:
                self.attempts += 1
            try:
                response = self._post_within(path, body)
            except httpx.TransportError as err:
                last, status = f"{type(err).__name__}: {err}", None
                logger.warning("%s endpoint %s: attempt %d failed (%s)", self.what, url, attempt + 1, last)
                continue
            if response.is_success:
                try:
                    return response.json()
                except ValueError as err:
                    raise EndpointError(f"{self.what} endpoint {url} sent a reply that is not JSON: {err}") from None
            last, status = f"HTTP {response.status_code}: {response.text[:300]}", response.status_code
            if status not in RETRY_STATUS:
                raise EndpointError(f"{self.what} endpoint {url} answered {last}", status)
            logger.warning("%s endpoint %s: attempt %d failed (%s)", self.what, url, attempt + 1, last)
        raise EndpointError(f"{self.what} endpoint {url} still failing after {self.retries} retries ({last})", status)

    def _post_within(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST ``body``; the whole reply must arrive within ``timeout_s`` (else ``httpx.ReadTimeout``)."""
        sockets: list[socket.socket] = []
        expired = threading.Event()

        def trace(event: str, info: dict[str, Any]) -> None:  # httpcore's trace hook: the new connection's socket
            if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
                sockets.append(info["return_value"].get_extra_info("socket"))
                if expired.is_set():
                    cut()

        def cut() -> None:
            expired.set()
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once

        timer = threading.Timer(self.timeout_s, cut)
        timer.daemon = True
        timer.start()
        try:
            return self.client.post(path, json=body, extensions={"trace": trace})
        except httpx.TransportError as err:
            if expired.is_set():
                raise httpx.ReadTimeout(f"no complete reply within timeout_s={self.timeout_s}") from err
            raise
        finally:
            timer.cancel()  # a cut just after the reply changes nothing: the connection is not reused

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> EndpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
