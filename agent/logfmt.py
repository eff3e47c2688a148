"""The agent's own log records: human text, or JSON lines for log shippers.

Either way one record is one line: a record's message often holds what a rank wrote (an
error file's message, a path, a job's reason), and a newline there must not forge a line
of the agent's log. The JSON form escapes by nature; the text form writes every
non-printable character of the message (newlines, carriage returns, escape sequences,
Unicode line separators) as its Python escape: "boom\\n" for "boom" and a newline. A
traceback (`logger.exception`) still follows on lines of its own: it is the agent's."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["GoneClientFilter", "JsonFormatter", "TextFormatter", "configure_logging", "escape"]

# Set through `extra=` by the supervisor: the job and rank a record is about.
_FIELDS = ("job_id", "restart_count", "local_rank", "pid")


def escape(text: str) -> str:
    """`text` with every non-printable character as its Python escape (`\\n`, `\\x1b`,
    `\\u2028`); `text` itself when it has none (the common case costs one scan)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class TextFormatter(logging.Formatter):
    """`time level logger: message`, the message escaped (see `escape`) so that a record
    is one line, but for a traceback that follows it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        safe = escape(message)
        if safe is message:
            return super().formatMessage(record)
        record.message = safe  # for this formatting only: other handlers see the original
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and job_id /
    restart_count / local_rank / pid when the record is about a job."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                data[field] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


class GoneClientFilter(logging.Filter):
    """gRPC's own ERROR record with a traceback for what is routine for an agent: a
    client that went away while a stream wrote to it (`rankd logs -f` and Ctrl-C; core
    then fails the write, "ExecuteBatchError raised in core by servicer method"). It
    becomes one DEBUG line without the traceback (dropped unless the agent logs at
    DEBUG); every other record of gRPC passes as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("ExecuteBatchError raised in core by servicer method"):
            return True
        what = "a client went away while " + message.rsplit(" ", 1)[-1] + " wrote to it"
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.msg, record.args = what, None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    grpc_core = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, GoneClientFilter) for f in grpc_core.filters):
        grpc_core.addFilter(GoneClientFilter())
