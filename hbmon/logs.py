"""Log formats: ``text`` (for people and journald), ``json`` and ``logfmt`` (for machines).

hbmon logs to stderr, one line a record.  ``--log-format`` (or the configuration's
``log_format``) picks the format:

* ``text``: ``2026-12-04 13:04:43,417 INFO hbmon.status: pair db1: verdict ...``.  When
  stderr is the systemd journal (``JOURNAL_STREAM`` names the very file stderr is, as
  systemd sets it for a service's output), each line starts with the sd-daemon priority
  prefix instead of the time (``<6>hbmon.status: ...``): journald strips it, stores the
  level as the entry's priority (``journalctl -p warning`` works) and stamps the time
  itself.
* ``json``: one object a line: ``time`` (UTC, ISO 8601, milliseconds), ``level``,
  ``logger``, ``message``, the record's structured fields, ``exception`` when there is one.
* ``logfmt``: ``time=... level=info logger=hbmon.status msg="..." pair=db1 ...``; values
  with spaces, quotes or ``=`` are quoted.

Structured fields are whatever a log call passes in ``extra=`` (every state change has
``event``, ``pair``, ``path``, ``state``, ``verdict``: see :mod:`hbmon.status`), plus the
fields :func:`setup` is given for every line (the site's name).  In the structured
formats on the journal the priority prefix is written too (journald strips it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

FORMATS = ("text", "json", "logfmt")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"  # (journald stamps the time)

#: sd-daemon(3) priorities: syslog levels by Python level.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}
CRITICAL_PRIORITY = 2

#: Attributes every LogRecord has: anything else on a record came in ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def priority(levelno: int) -> int:
    """The syslog priority of a Python log level (between levels: the more severe)."""
    if levelno >= logging.CRITICAL:
        return CRITICAL_PRIORITY
    for level in (logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of ``record`` (what came in ``extra=``), in their order."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


def _iso(created: float) -> str:
    whole = int(created)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{stamp}.{int((created - whole) * 1000):03d}Z"


class _Prefixed(logging.Formatter):
    """A formatter that can start every line with the sd-daemon priority prefix."""

    def __init__(self, fmt: str | None = None, *, journal: bool = False) -> None:
        super().__init__(fmt)
        self.journal = journal

    def _prefix(self, record: logging.LogRecord, text: str) -> str:
        if not self.journal:
            return text
        tag = f"<{priority(record.levelno)}>"
        # Every line of a multi-line record (a traceback): journald reads lines.
        return "\n".join(tag + line for line in text.split("\n"))


class TextFormatter(_Prefixed):
    """The human format; on the journal, priority-prefixed and without the time."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__(JOURNAL_FORMAT if journal else TEXT_FORMAT, journal=journal)

    def format(self, record: logging.LogRecord) -> str:
        return self._prefix(record, super().format(record))


class JsonFormatter(_Prefixed):
    """One JSON object a line."""

    def __init__(self, static: Mapping[str, Any] | None = None, *, journal: bool = False) -> None:
        super().__init__(journal=journal)
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self.static,
            **fields(record),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return self._prefix(record, json.dumps(doc, default=str, ensure_ascii=False))


def logfmt_value(value: object) -> str:
    """One logfmt value: bare when it can be, else double-quoted with escapes."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\r\t') and text.isprintable():
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return '"' + escaped.replace("\t", "\\t") + '"'


class LogfmtFormatter(_Prefixed):
    """``key=value`` pairs, one record a line."""

    def __init__(self, static: Mapping[str, Any] | None = None, *, journal: bool = False) -> None:
        super().__init__(journal=journal)
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        pairs: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
            **fields(record),
        }
        if record.exc_info:
            pairs["exception"] = self.formatException(record.exc_info)
        line = " ".join(f"{key}={logfmt_value(value)}" for key, value in pairs.items())
        return self._prefix(record, line)


def on_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the systemd journal: ``JOURNAL_STREAM`` (``DEVICE:INODE``)
    names the file it is.  The variable alone is not enough: a child of a service
    inherits it with its stderr redirected elsewhere (systemd.exec(5))."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def formatter(
    fmt: str, *, journal: bool = False, static: Mapping[str, Any] | None = None
) -> logging.Formatter:
    """The formatter for ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "text":
        return TextFormatter(journal=journal)
    if fmt == "json":
        return JsonFormatter(static, journal=journal)
    if fmt == "logfmt":
        return LogfmtFormatter(static, journal=journal)
    raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")


def setup(
    fmt: str = "text",
    level: str | int = "info",
    *,
    stream: TextIO | None = None,
    static: Mapping[str, Any] | None = None,
    force: bool = False,
) -> logging.Handler | None:
    """Log to ``stream`` (stderr) in ``fmt`` at ``level``; ``static`` fields go on every
    structured line.  Replaces the handler an earlier call installed (so it is called
    again once the configuration is known).  Like :func:`logging.basicConfig`, it adds
    nothing when the root logger has handlers of someone else's (a test harness, an
    embedding program) unless ``force``; returns the handler installed, or None."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "hbmon", False):
            root.removeHandler(old)
            old.close()
    if root.handlers and not force:
        return None
    root.setLevel(level.upper() if isinstance(level, str) else level)
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.hbmon = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter(fmt, journal=on_journal(stream), static=static))
    root.addHandler(handler)
    return handler
