"""Log output of the daemon: console lines for people or JSON lines for collectors."""

from __future__ import annotations

import json
import logging
import sys
from typing import Final

_CONSOLE_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (epoch seconds), ``level``, ``logger``, ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(verbose: int, quiet: int, log_format: str = "console") -> None:
    """Log to stderr at INFO, one step lower per ``-v`` and higher per ``-q``."""
    level = max(logging.DEBUG, min(logging.INFO - 10 * verbose + 10 * quiet, logging.CRITICAL))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(_CONSOLE_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # hypercorn's access log is noise at INFO for a local socket.
    logging.getLogger("hypercorn.access").setLevel(max(level, logging.WARNING))
