"""Structured logs: one JSON object per line. Keys and secrets are never passed to a logger; secrets
that may reach one anyway inside an exception's message (the database password, which drivers may
quote) are registered with `hide` and replaced by *** in every line written."""

import json
import logging
import sys
import threading
import time
import traceback

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# shorter strings are not scrubbed: replacing every "ab" would garble the logs, and hide no real secret
SECRET_CHARACTERS_MIN = 4
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def hide(*secrets: str) -> None:
    """Registers secrets to be replaced by *** in every log line and in `scrub`'s output."""
    global _secrets
    with _secrets_lock:
        forms = set(_secrets)
        for secret in secrets:
            if len(secret) >= SECRET_CHARACTERS_MIN:
                forms.add(secret)
                forms.add(json.dumps(secret)[1:-1])  # as it appears inside a JSON string
        _secrets = tuple(sorted(forms, key=len, reverse=True))


def scrub(text: str) -> str:
    """The text with every registered secret replaced by ***."""
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, default=str))


class TextFormatter(logging.Formatter):
    """For a person at a terminal: `HH:MM:SS level logger: message key=value ...`, secrets scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        line = (
            time.strftime("%H:%M:%S", time.localtime(record.created))
            + f" {record.levelname.lower():7} "
            + f"{record.name}: {record.getMessage()}"
            + (f"  {extra}" if extra else "")
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


FORMATS = ("auto", "json", "text")
# libraries whose INFO lines are about their own workings (pgserver: initdb and pg_ctl command lines):
# shown at DEBUG only
_CHATTY = ("pgserver",)


class ScrubbingStream:
    """A text stream (stdout, stderr) that scrubs registered secrets from what is written to it, so a
    print of an exception's message cannot leak one either."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(scrub(text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _excepthook(kind, value, trace) -> None:
    """An exception nobody caught: its traceback, scrubbed, on stderr."""
    sys.stderr.write(scrub("".join(traceback.format_exception(kind, value, trace))))


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    """Logs to stderr: JSON lines (one object a line, for collectors), or text when `fmt` is "text" or
    "auto" and stderr is a terminal."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), ScrubbingStream):
            setattr(sys, name, ScrubbingStream(getattr(sys, name)))
    text = fmt == "text" or (fmt == "auto" and sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(level if level == "DEBUG" else "WARNING")
    sys.excepthook = _excepthook
