"""Structured logs: one JSON object per line, each carrying the id of the request (or job) it belongs to.

The request id lives in a context variable that the request middleware sets; a log record factory copies
it (and a running job's id) onto every record when the record is made, so every line logged while a request
is handled (in the event loop, in the thread pool, in uvicorn's access log) names it, and so do the lines
of a background job, which runs in the context of the request that submitted it.
"""

from __future__ import annotations

import json
import logging
import logging.config
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from schemas.text import printable

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("job_id", default=None)

# The attributes every LogRecord has; anything else on a record came in through `extra=` and is logged too.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "job_id",
    "color_message",  # uvicorn's coloured copy of the message
    "context",  # TextFormatter's
    "taskName",
}
_installed = False


def install_record_factory() -> None:
    """Make every log record carry `request_id` and `job_id` (None outside a request or job). Idempotent."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = REQUEST_ID.get()
        record.job_id = JOB_ID.get()
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "request_id", "job_id", ...extra fields, "exception"}` per line.
    uvicorn's access log lines also get `client`, `method`, `path`, `http_version` and `status`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, http_version, status = record.args
            entry.update(client=client, method=method, path=path, http_version=http_version, status=status)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # JSON escapes every control character; a lone surrogate a client sent is written as its escape
        return json.dumps(entry, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace").decode()


class TextFormatter(logging.Formatter):
    """`LEVEL logger [request id]: message`, for reading logs in a terminal (LOG_FORMAT=text).

    One record starts one line and only one: control characters in the message (a client's file name with a
    newline, an escape sequence) are written as escapes, and the lines of a traceback are indented, so no
    text a client sent can begin a line that reads as a record of its own."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s%(context)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [str(v) for v in (getattr(record, "request_id", None), getattr(record, "job_id", None)) if v]
        record.context = f" [{' '.join(ids)}]" if ids else ""
        record.message = printable(record.getMessage())
        line = self.formatMessage(record)
        # formatted here, not taken from record.exc_text: another handler may have cached it unindented
        if record.exc_info:
            line += "\n" + _indented(self.formatException(record.exc_info))
        elif record.exc_text:
            line += "\n" + _indented(record.exc_text)
        if record.stack_info:
            line += "\n" + _indented(self.formatStack(record.stack_info))
        return line


def _indented(text: str) -> str:
    return "\n".join("    " + printable(line) for line in text.splitlines())


def logging_config(log_format: str = "json", level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for the service and uvicorn (its `log_config`): one handler on stderr,
    uvicorn's own loggers (server and access log) routed to it with the same formatter."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": f"{__name__}.JsonFormatter"},
            "text": {"()": f"{__name__}.TextFormatter"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": log_format, "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.error": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "INFO", "propagate": True},
        },
        "root": {"handlers": ["stderr"], "level": level},
    }


def configure_logging(log_format: str = "json", level: str = "INFO") -> dict[str, Any]:
    """Apply `logging_config` to this process (and return it, for uvicorn)."""
    install_record_factory()
    config = logging_config(log_format, level)
    logging.config.dictConfig(config)
    return config
