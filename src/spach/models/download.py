"""One URL into one open file, within bounds, every failure one line (the official weights' download).

urllib does the transfer (http, https and file URLs, proxies from the environment). Bounds:
- `timeout` (SPACH_DOWNLOAD_TIMEOUT, default 60 s) bounds each connect and read: a server that sends
  nothing for that long fails the download;
- a minimum average rate derived from it: once a download has run for 2 x `timeout`, it must have
  brought 1 MiB per `timeout` seconds since, so a server that drips (a byte a second keeps every read
  alive) fails too. The deadline is start + 2 x timeout + timeout per MiB received; a watchdog thread
  enforces it by shutting the connection down, so it holds while urllib waits for headers or follows
  redirects as well as during the body. A higher SPACH_DOWNLOAD_TIMEOUT allows a slower link;
- at most MAX_BYTES (an endless stream is not a checkpoint).
Every exception urllib and http.client raise (OSError and URLError, ssl errors, HTTPException and its
subclasses, ValueError for a malformed URL) becomes a DownloadError whose message is one line saying
what went wrong; errors writing the output file stay OSErrors (they are the disk's, not the server's).
"""
from __future__ import annotations

import http.client
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, BinaryIO, Callable, TypeVar

from tqdm import tqdm

from spach.errors import SpachError
from spach.text import one_line
from spach.humanize import count

TIMEOUT_ENV = "SPACH_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
STEP_BYTES = 2**20  # what each `timeout` seconds must bring on average, after the first 2 x timeout
MAX_BYTES = 2**31  # the largest official checkpoint is a few hundred MB
CHUNK = 2**16
NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError)  # everything urllib/http.client raise
T = TypeVar("T")


class DownloadError(Exception):
    """A download that failed: its message is one line saying what went wrong."""


def download_timeout() -> float:
    """Seconds a download may wait for the server's next bytes (`SPACH_DOWNLOAD_TIMEOUT`, default 60)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise SpachError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds above 0; e.g. {TIMEOUT_ENV}=120")
    return value


def download(url: str, out: BinaryIO, timeout: float, progress: bool = False) -> int:
    """Write what `url` holds to `out`; returns the bytes written. A DownloadError when the server
    fails, stalls, drips or sends too much; an OSError when `out` cannot be written."""
    with _Watchdog(timeout) as watch:
        opener = urllib.request.build_opener(_HTTP(watch), _HTTPS(watch))
        headers = {"User-Agent": "spach"}
        response = watch.call(lambda: opener.open(urllib.request.Request(url, headers=headers), timeout=timeout))
        with response:
            size = _length(response)
            if size is not None and size > MAX_BYTES:
                raise DownloadError(f"the server offers {count(size)}B, more than any checkpoint ({count(MAX_BYTES)}B)")
            read = getattr(response, "read1", response.read)  # read1: what has arrived, not a full buffer
            with tqdm(total=size, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024) as bar:
                while chunk := watch.call(lambda: read(CHUNK)):
                    out.write(chunk)
                    bar.update(len(chunk))
                    watch.got(len(chunk))
            left = getattr(response, "length", None)  # http.client counts the Content-Length down
            if left:
                raise DownloadError(f"the server closed the connection after {count(watch.received)}B of "
                                    f"{count(watch.received + left)}B")
    out.flush()
    return watch.received


def describe(e: BaseException, timeout: float) -> str:
    """What an exception of urllib or http.client means for a download, as one line."""
    cause = e.reason if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError) else e
    if isinstance(cause, TimeoutError):
        return f"the server sent nothing for {timeout:g} s; {TIMEOUT_ENV} sets how long to wait"
    if isinstance(e, urllib.error.HTTPError):
        if str(e.reason).startswith(urllib.request.HTTPRedirectHandler.inf_msg):
            return (f"HTTP {e.code}: the redirects go round in a loop or past "
                    f"{urllib.request.HTTPRedirectHandler.max_redirections}")
        return f"HTTP {e.code} {one_line(e.reason)}"
    if isinstance(cause, http.client.InvalidURL):
        return f"not a valid URL: {one_line(cause)}"
    if isinstance(cause, http.client.RemoteDisconnected):
        return "the server closed the connection without an answer"
    if isinstance(cause, http.client.IncompleteRead):
        return "the connection broke off in the middle of the file"
    if isinstance(cause, http.client.HTTPException):
        detail = one_line(cause, 80)
        return f"the server's answer is not valid HTTP ({type(cause).__name__}{': ' + detail if detail else ''})"
    return one_line(cause) or type(cause).__name__


def _length(response: Any) -> int | None:
    try:
        return int(response.headers.get("Content-Length"))
    except (AttributeError, TypeError, ValueError):
        return None


class _Watchdog:
    """Fails a download that falls below the minimum average rate (see the module's docstring) by
    shutting down the sockets it uses; `call` runs one step of the transfer and says why it failed."""

    def __init__(self, timeout: float):
        self.timeout, self.received, self.tripped = timeout, 0, ""
        self.started = time.monotonic()
        self.sockets: list[socket.socket] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="spach-download-watchdog", daemon=True)

    def __enter__(self) -> "_Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def deadline(self) -> float:
        return self.started + self.timeout * (2 + self.received / STEP_BYTES)

    def _watch(self) -> None:
        while not self._done.wait(max(0.0, self.deadline() - time.monotonic())):
            if time.monotonic() >= self.deadline():
                self.tripped = (f"too slow: {count(self.received)}B in {time.monotonic() - self.started:.0f} s, below the "
                                f"1 MiB per {self.timeout:g} s a download must average; a higher {TIMEOUT_ENV} allows a "
                                f"slower link")
                for sock in list(self.sockets):
                    self._shut(sock)
                return

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:  # the plain socket's shutdown (an SSL socket's own would drop its TLS state under the reader)
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def add(self, sock: socket.socket) -> None:
        self.sockets.append(sock)
        if self.tripped:  # a connection opened after the deadline (a redirect): end it too
            self._shut(sock)

    def got(self, n: int) -> None:
        self.received += n
        if self.received > MAX_BYTES:
            raise DownloadError(f"the server sent more than {count(MAX_BYTES)}B, more than any checkpoint")

    def call(self, step: Callable[[], T]) -> T:
        try:
            result = step()
        except NETWORK_ERRORS as e:
            raise DownloadError(self.tripped or describe(e, self.timeout)) from None
        if self.tripped:
            raise DownloadError(self.tripped)
        return result


class _Watched:
    """An urllib handler whose connections are registered with a watchdog as they open."""

    def __init__(self, watch: _Watchdog):
        super().__init__()
        self.watch = watch

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        watch = self.watch

        class Connection(http_class):
            def connect(self) -> None:
                super().connect()
                watch.add(self.sock)

        return super().do_open(Connection, req, **kwargs)


class _HTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _HTTPS(_Watched, urllib.request.HTTPSHandler):
    pass
