"""Connections, below the requests, and the server that holds them. rerankd serves HTTP/1.1 through uvicorn's
h11 protocol, subclassed for what uvicorn leaves out and servers behind nginx or TEI have, so that idle or
slow clients cannot hold every file descriptor:

- a header timeout: a connection must send a complete request head within `--header-timeout` of connecting,
  and a next request's head within it of its first byte (between requests, uvicorn's keep-alive timeout
  applies); past it, an idle connection is closed, and one that began a request gets 408 first;
- a connection cap, `--max-connections`: a connection past it gets a canned 503 and is closed at once, which
  frees its descriptor before the next `accept()`. By default the cap is the open-files limit (raised to its
  hard limit at start) less a reserve, so `accept()` never runs out of descriptors while the cap holds;
- a failed `accept()` (the cap set past what the limit allows) is logged once per interval, not per attempt:
  asyncio reports every attempt, and retries thousands of times a second;
- a stop signal also starts the app's shutdown grace (`GracefulServer`), so that requests still running when
  it runs out answer 503 in their route's shape before uvicorn would cancel them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
from dataclasses import dataclass
from http import HTTPStatus
from socket import socket
from types import FrameType
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rerankd.api.errors import APIError, ErrorType, error_headers, native_error
from rerankd.api.state import Shutdown
from rerankd.settings import ServeSettings

logger = logging.getLogger(__name__)

# Descriptors kept out of the default cap: the process's own (9 on a CPU once a model is loaded; CUDA's
# driver, a Hub download or llama.cpp add some), and the connections accepted before the cap can refuse them:
# a refused connection's descriptor is closed three loop turns after its accept(), and asyncio accepts up to
# the listen backlog each turn (under a 1,024 limit, a flood of three clients ran a backlog of 128 out of 374
# spare descriptors; 64 held with 384 in reserve).
PROCESS_DESCRIPTORS = 128
ACCEPT_TURNS = 4
THROTTLE_SECONDS = 10.0
SHUTDOWN_MARGIN_SECONDS = 2.0  # past the grace, for the app's 503s to go out before uvicorn cancels tasks
# asyncio's message, through the loop's exception handler, for a failed accept() (EMFILE, ENFILE, ENOBUFS
# or ENOMEM).
ACCEPT_ERROR = "socket.accept() out of system resource"


class ThrottledWarning:
    """A warning that a flood would repeat thousands of times a second: logged at most once per interval,
    with how many were left out since the last one."""

    def __init__(self, interval_seconds: float = THROTTLE_SECONDS) -> None:
        self.interval_seconds = interval_seconds
        self._quiet_until = float("-inf")
        self._left_out = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now < self._quiet_until:
            self._left_out += 1
            return
        if self._left_out:
            message += f" ({self._left_out} more since the last such line)"
        logger.warning(message)
        self._quiet_until, self._left_out = now + self.interval_seconds, 0


def throttle_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log the loop's failed `accept()`s once per interval; every other report goes to asyncio's handler."""
    throttled = ThrottledWarning()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_ERROR:
            throttled.warn(
                f"{ACCEPT_ERROR}: {context.get('exception')}; new connections wait until descriptors are "
                "free (is --max-connections past what the open-files limit allows?)"
            )
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one, as nginx's `worker_rlimit_nofile` does (each
    connection holds a descriptor); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit some systems refuse
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def listen_backlog(open_files: int) -> int:
    """uvicorn's 2,048, less under a small open-files limit, each loop turn's accepts being held a while."""
    return max(16, min(2048, open_files // 16))


def default_max_connections(open_files: int) -> int:
    """The open-files limit less the process's own descriptors and `ACCEPT_TURNS` backlogs (640 of 1,024)."""
    reserve = PROCESS_DESCRIPTORS + ACCEPT_TURNS * listen_backlog(open_files)
    return max(open_files // 4, open_files - reserve)


def canned_response(error: APIError) -> bytes:
    """`error` as a whole HTTP/1.1 response in rerankd's own error shape, closing the connection: written
    straight to the transport, since h11 only answers a request it has parsed."""
    body = json.dumps(native_error(error)).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **error_headers(error)}
    head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}"]
    head += [f"{name}: {value}" for name, value in {**headers, "Connection": "close"}.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    max_connections: int
    listen_backlog: int


def connection_limits(settings: ServeSettings) -> ConnectionLimits:
    """This process's limits, the open-files limit raised first: the cap is derived from it unless set."""
    open_files = raise_open_files_limit()
    room = default_max_connections(open_files)
    max_connections = settings.max_connections or room
    if max_connections > room:
        logger.warning(
            "--max-connections %d leaves fewer than %d of the %d open files for the process itself: accept() "
            "may fail under load",
            max_connections,
            open_files - room,
            open_files,
        )
    logger.info(
        "connections: at most %d open (open-files limit %d); headers within %g s, kept alive %g s idle",
        max_connections,
        open_files,
        settings.header_timeout,
        settings.keep_alive_timeout,
    )
    return ConnectionLimits(settings.header_timeout, max_connections, listen_backlog(open_files))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a connection cap. uvicorn makes one per connection
    from the class alone, so each server gets a subclass carrying its limits (`with_limits`)."""

    limits: ClassVar[ConnectionLimits]
    refusals: ClassVar[ThrottledWarning]
    busy_response: ClassVar[bytes]
    head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[GuardedH11Protocol]:
        message = f"server busy: {limits.max_connections} connections open (--max-connections); retry soon"
        busy = APIError(503, message, ErrorType.OVERLOADED)
        attributes = {
            "limits": limits,
            "refusals": ThrottledWarning(),
            "busy_response": canned_response(busy),
        }
        return type(cls.__name__, (cls,), attributes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.refusals.warn(
                f"refused a connection: {self.limits.max_connections} open (--max-connections)"
            )
            self.transport.write(self.busy_response)
            self.transport.close()
        else:
            self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self.head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or the connection failed)
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: say why the connection ends
            message = (
                f"request headers not received within {self.limits.header_timeout:g} s (--header-timeout)"
            )
            self.transport.write(canned_response(APIError(408, message, ErrorType.TIMEOUT, "headers")))
        self.transport.close()


class GracefulServer(uvicorn.Server):
    """uvicorn's server, stopping as rerankd does: a stop signal also starts the app's shutdown grace, and
    uvicorn cancels what still runs only `SHUTDOWN_MARGIN_SECONDS` after it; a signal that came before uvicorn
    took the signals over (`early_signals`) stops the server before it starts."""

    def __init__(
        self, config: uvicorn.Config, shutdown: Shutdown, grace_seconds: float, early_signals: list[int]
    ) -> None:
        config.timeout_graceful_shutdown = grace_seconds + SHUTDOWN_MARGIN_SECONDS  # type: ignore[assignment]
        super().__init__(config)
        self.app_shutdown = shutdown
        self.grace_seconds = grace_seconds
        self.early_signals = early_signals

    async def startup(self, sockets: list[socket] | None = None) -> None:
        throttle_accept_errors(asyncio.get_running_loop())
        if self.early_signals:
            self.should_exit = True
            return
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app_shutdown.begin(self.grace_seconds)
        super().handle_exit(sig, frame)
