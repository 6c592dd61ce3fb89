"""Logging set-up and the access log: one line per HTTP request and per WebSocket session.

Lines go to stderr, as text (`key=value` pairs, easy to grep) or as JSON lines
(orjson), chosen by `[logging] format`.  A request's line has the fields
`[logging] access_log_fields` names, in that order (`config.ACCESS_LOG_FIELDS`
lists them); WebSocket close lines have a fixed set.
"""

from __future__ import annotations

import logging
import sys

import orjson

from edgeproxy.config import LoggingConfig

access_logger = logging.getLogger("edgeproxy.access")
log = logging.getLogger("edgeproxy")


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        if fields is not None:
            doc.update(fields)
        else:
            doc["msg"] = record.getMessage()
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def _text_value(value) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "='):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        fields = getattr(record, "fields", None)
        if fields is not None:
            record.message = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return super().formatMessage(record)


def configure_logging(config: LoggingConfig) -> None:
    """Send every edgeproxy log line to stderr in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if config.format == "json" else _TextFormatter())
    root = logging.getLogger("edgeproxy")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    root.propagate = False
    access_logger.disabled = not config.access_log


def access_enabled() -> bool:
    """Whether access-log lines are written (so a caller can skip building them)."""
    return access_logger.isEnabledFor(logging.INFO)


def access(fields: dict) -> None:
    """Write one access-log line (a dict of fields, kept in order)."""
    if access_logger.isEnabledFor(logging.INFO):
        access_logger.info("", extra={"fields": fields})


def request_line(selected: tuple[str, ...], head, fields: dict) -> None:
    """One request's access-log line with the ``[logging] access_log_fields`` in ``selected``.

    ``fields`` holds every field but the request-header ones, which come from ``head``.
    """
    for name, header in (("user_agent", b"user-agent"), ("referer", b"referer")):
        if name in selected:
            value = head.header(header) if head else None
            fields[name] = value.decode("latin-1") if value is not None else "-"
    access({name: fields[name] for name in selected})
