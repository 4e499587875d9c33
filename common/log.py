"""Logging set-up for psgrid processes; only ``main()`` functions call it.

One line format everywhere: time, level, node (the process's role or name),
logger, message; or one JSON object per line with ``--log-json``.
"""
from __future__ import annotations

import json
import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)-7s %(node)s %(name)s: %(message)s"


class _NodeFilter(logging.Filter):
    def __init__(self, node: str):
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, node, logger, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "node": getattr(record, "node", ""),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", stream=None, node: str = "psgrid", as_json: bool = False) -> None:
    """Configure the root logger for one process named ``node``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_NodeFilter(node))
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
