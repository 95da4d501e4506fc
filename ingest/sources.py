"""Image references to bytes: local files inside the folders a catalogue may read (`PhotoAccess`), http(s) URLs.

URLs go through `UrlFetcher`: a bounded number of fetches at a time, one deadline for the whole fetch of a
photo (connection, redirects, body and retries: a host that trickles a byte at a time cannot hold it longer),
a few retries with exponential back-off on connection errors, 5xx and 429, a size cap, a content-type
check, redirects followed one hop at a time, and a cancel event that stops a fetch within a fraction of a
second (the service's shutdown). Every connection (the first one and each redirect's) is opened by a network
backend that resolves the host name itself, refuses it when any of its addresses is not a global one
(private, loopback, link-local, reserved, multicast, unspecified) unless private URLs are allowed, and
then connects to exactly the addresses it checked, so a second DNS answer cannot slip past the check.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpcore
import httpx

from retrieval.images import MAX_IMAGE_BYTES, LocalFileError, is_url, read_regular_file
from retrieval.settings import Settings

URL_TIMEOUT_S = 15.0
MAX_REDIRECTS = 5
MAX_BACKOFF_S = 8.0
IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "product-match-ingest/0.1 (+catalogue image fetch)"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]


class SourceError(ValueError):
    """An image reference that cannot be read; the message goes into the reject report."""


class BlockedAddress(SourceError):
    """A URL whose host resolves to an address that is not allowed (private networks, by default)."""


class FetchCancelled(Exception):
    """The run was asked to stop while a URL was being fetched (not a problem of the photo: nothing is reported)."""


# A blocked read or write wakes up this often to look at the fetch's deadline and cancel event.
POLL_S = 0.25


class _Budget(threading.local):
    """The deadline and cancel event of the fetch running on this thread, read by its network streams."""

    deadline: float = float("inf")
    cancel: threading.Event | None = None

    def step(self, timeout: float | None = None) -> float:
        """How long the next blocking socket call may wait: raises once cancelled or past the deadline."""
        if self.cancel is not None and self.cancel.is_set():
            raise FetchCancelled("cancelled")
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise httpcore.ReadTimeout("the fetch's deadline has passed")
        return min(POLL_S, remaining, timeout if timeout is not None else remaining)


class _BudgetedStream(httpcore.NetworkStream):
    """A socket stream whose reads and writes wait in short steps, so the fetch's deadline and cancel event
    are honoured however slowly the peer sends (a per-read timeout alone lets one byte every few seconds
    keep a fetch alive for ever)."""

    def __init__(self, stream: httpcore.NetworkStream, budget: _Budget) -> None:
        self._stream = stream
        self._budget = budget

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        while True:
            step = self._budget.step()  # raises once the fetch is cancelled or out of time
            try:
                return self._stream.read(max_bytes, step)
            except httpcore.ReadTimeout:
                continue  # only this step ran out

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._budget.step(timeout))  # requests are a few hundred bytes

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        remaining = self._budget.deadline - time.monotonic()
        wait = max(0.001, min(remaining, timeout if timeout is not None else remaining))
        return _BudgetedStream(self._stream.start_tls(ssl_context, server_hostname, wait), self._budget)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class OutsideRoot(SourceError):
    """A local photo reference outside the folders its catalogue may read from: the row is refused."""


@dataclass(frozen=True)
class PhotoAccess:
    """Which local files a catalogue's photo references may open, decided by who supplied the catalogue.

    A reference is resolved against `base_dir` (the catalogue's folder), every symbolic link in it followed,
    and must then lie inside one of `roots`: for a CLI user the catalogue's folder and the folders they name
    (`--photo-root`), for an uploaded zip its own extraction folder, for an uploaded catalogue file none at
    all (URLs only). The check looks at nothing on disk but the path's links, so its answer never tells a
    client whether a path outside the roots exists. Only regular files are then read, bounded in size."""

    base_dir: Path
    roots: tuple[Path, ...]
    refusal: str  # the reason a reference outside the roots is refused with
    expand_user: bool = True  # `~` means the home folder (a CLI user's catalogue), or is an ordinary name

    @classmethod
    def within(cls, base_dir: Path, roots: Iterable[Path], refusal: str, *, expand_user: bool = True) -> PhotoAccess:
        real = tuple(dict.fromkeys(Path(os.path.realpath(root)) for root in roots))
        return cls(Path(os.path.realpath(base_dir)), real, refusal, expand_user)

    def resolve(self, ref: str) -> str:
        """A URL stays as it is; a path becomes the real absolute path it names, or OutsideRoot."""
        if is_url(ref):
            return ref
        if "://" in ref:
            raise SourceError("unsupported image URL scheme: use http(s) or a file path")
        if "\x00" in ref:
            raise OutsideRoot(self.refusal)
        path = Path(ref).expanduser() if self.expand_user and ref.startswith("~") else Path(ref)
        real = Path(os.path.realpath(self.base_dir / path))
        if not any(real.is_relative_to(root) for root in self.roots):
            raise OutsideRoot(self.refusal)
        return str(real)

    def read(self, resolved: str, *, client: UrlFetcher, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
        """The bytes behind a reference `resolve` returned, bounded in size (and in time for a URL)."""
        if is_url(resolved):
            return client.fetch(resolved, max_bytes=max_bytes)
        try:
            return read_regular_file(resolved, max_bytes=max_bytes)
        except LocalFileError as exc:
            raise SourceError(str(exc)) from None


def file_signature(ref: str) -> str:
    """'size:mtime_ns' of a resolved local regular file ('' for a URL or anything else): equal signatures
    stand for equal bytes in incremental ingest."""
    if is_url(ref):
        return ""
    try:
        info = os.stat(ref)
    except (OSError, ValueError):
        return ""
    return f"{info.st_size}:{info.st_mtime_ns}" if stat.S_ISREG(info.st_mode) else ""


def address_problem(address: IPAddress) -> str | None:
    """Why an address may not be fetched from without ALLOW_PRIVATE_URLS, or None for a global address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            inner = address_problem(embedded)
            return f"{inner} (inside {address})" if inner else None
    for check, name in (
        (address.is_unspecified, "an unspecified"),
        (address.is_loopback, "a loopback"),
        (address.is_link_local, "a link-local"),
        (address.is_multicast, "a multicast"),
        (address.is_private, "a private"),
        (address.is_reserved, "a reserved"),
        (not address.is_global, "a non-global"),
    ):
        if check:
            return f"{name} address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host (IP literals come back as themselves)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # a temporary failure: worth a retry
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        raise SourceError(f"cannot resolve host {host}: {exc.strerror or exc}") from None
    except UnicodeError:
        raise SourceError(f"bad host name {host!r}") from None
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        if address not in addresses:
            addresses.append(address)
    return addresses


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves, checks every address, then connects to exactly those addresses."""

    def __init__(self, *, allow_private: bool, allow_hosts: frozenset[str], resolver: Resolver) -> None:
        self.allow_private = allow_private
        self.allow_hosts = allow_hosts
        self.resolver = resolver
        self.budget = _Budget()

    def checked_addresses(self, host: str, port: int) -> Sequence[str]:
        addresses = self.resolver(host, port)
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        if self.allow_private or host.lower() in self.allow_hosts:
            return addresses
        for text in addresses:
            problem = address_problem(ipaddress.ip_address(text))
            if problem:
                shown = f"{host} is" if host == text else f"{host} resolves to {text},"
                raise BlockedAddress(
                    f"refused: {shown} {problem}; set ALLOW_PRIVATE_URLS=true to fetch images from private networks"
                )
        return addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        error: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in self.checked_addresses(host, port):
            try:
                self.budget.step()  # cancelled, or out of time
                wait = max(0.001, min(self.budget.deadline - time.monotonic(), timeout or float("inf")))
                stream = super().connect_tcp(address, port, wait, local_address, socket_options)
                return _BudgetedStream(stream, self.budget)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with the connection pool opening its sockets through `_GuardedBackend`."""

    def __init__(self, backend: _GuardedBackend, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


class UrlFetcher:
    """Fetches image URLs for one ingest run; thread-safe, at most `concurrency` requests in flight."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        allow_hosts: Iterable[str] = (),
        retries: int = 3,
        timeout_s: float = URL_TIMEOUT_S,
        concurrency: int = 8,
        max_bytes: int = MAX_IMAGE_BYTES,
        backoff_s: float = 0.5,
        max_backoff_s: float = MAX_BACKOFF_S,
        resolver: Resolver = system_resolver,
        cancel: threading.Event | None = None,
    ) -> None:
        """`timeout_s` bounds one photo's whole fetch (retries included); `cancel` stops every fetch."""
        self.retries = retries
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.concurrency = concurrency
        self._backend = _GuardedBackend(
            allow_private=allow_private, allow_hosts=frozenset(h.lower() for h in allow_hosts), resolver=resolver
        )
        self.cancel = cancel
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> UrlFetcher:
        options: dict[str, Any] = {
            "allow_private": settings.allow_private_urls,
            "allow_hosts": [h.strip() for h in settings.url_allow_hosts.split(",") if h.strip()],
            "retries": settings.url_retries,
            "timeout_s": settings.url_timeout_s,
            "concurrency": settings.url_concurrency,
        }
        return cls(**{**options, **overrides})

    def __enter__(self) -> UrlFetcher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
                self._client = httpx.Client(
                    transport=_GuardedTransport(self._backend, limits),
                    timeout=self.timeout_s,
                    follow_redirects=False,
                    trust_env=False,
                    headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
                )
            return self._client

    def fetch(self, url: str, *, max_bytes: int | None = None) -> bytes:
        """The body of an image URL, or SourceError with the reason (after the retries, where they apply and
        time is left); FetchCancelled when the cancel event is set meanwhile."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        self._acquire_slot()
        budget = self._backend.budget
        budget.deadline, budget.cancel = time.monotonic() + self.timeout_s, self.cancel
        try:
            return self._fetch_in_time(url, limit, budget)
        finally:
            budget.deadline, budget.cancel = float("inf"), None
            self._slots.release()

    def _acquire_slot(self) -> None:
        while not self._slots.acquire(timeout=POLL_S):
            if self.cancel is not None and self.cancel.is_set():
                raise FetchCancelled("cancelled")

    def _fetch_in_time(self, url: str, limit: int, budget: _Budget) -> bytes:
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return self._fetch_once(url, limit)
            except _Retryable as exc:
                remaining = budget.deadline - time.monotonic()
                if remaining <= 0:
                    raise SourceError(f"{exc.reason} (no answer within {self.timeout_s:g} s, URL_TIMEOUT_S)") from None
                if attempt + 1 == attempts:
                    tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
                    raise SourceError(f"{exc.reason} (gave up after {tries})") from None
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.max_backoff_s))
                delay *= random.uniform(1.0, 1.1)  # a little jitter: parallel retries spread out
                if delay >= remaining:
                    raise SourceError(f"{exc.reason} (no time left for a retry within {self.timeout_s:g} s)") from None
                if self.cancel is not None and self.cancel.wait(delay):
                    raise FetchCancelled("cancelled") from None
                if self.cancel is None:
                    time.sleep(delay)
        raise AssertionError("unreachable")

    def _fetch_once(self, url: str, limit: int) -> bytes:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            if not is_url(current):
                raise SourceError(f"redirected to {current!r}: only http(s) URLs are fetched")
            try:
                with self._http().stream("GET", current) as response:
                    if response.status_code in REDIRECT_CODES and "location" in response.headers:
                        current = str(response.url.join(response.headers["location"]))
                        continue
                    return self._body(response, current, limit)
            except BlockedAddress as exc:
                if current == url:
                    raise
                raise BlockedAddress(f"redirected from {url} to {current}: {exc}") from None
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise SourceError(f"bad URL {current}: {exc}") from None
            except httpx.TransportError as exc:  # connection refused / reset, timeouts, a cut-off response
                raise _Retryable(f"cannot fetch {current}: {exc.__class__.__name__}: {exc}") from None
        raise SourceError(f"more than {MAX_REDIRECTS} redirects from {url}")

    @staticmethod
    def _body(response: httpx.Response, url: str, limit: int) -> bytes:
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status} for {url}", _retry_after(response.headers.get("retry-after")))
        if status != 200:
            raise SourceError(f"HTTP {status} for {url}")
        kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind and not kind.startswith(IMAGE_CONTENT_TYPES):
            raise SourceError(f"{url} is {kind}, not an image")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise SourceError(f"{url} is {declared} bytes, over the limit of {limit}")
        chunks, total = [], 0
        for chunk in response.iter_bytes():
            total += len(chunk)
            if total > limit:
                raise SourceError(f"{url} is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
