"""The agent's log lines: text for a person reading ``kubectl logs``, or one JSON object a line for a log pipeline.

Every line names the node it is about (``node=<name>`` in text, ``"node"`` in JSON): with thousands of agents
shipping into one place, a line that does not say which node wrote it is of no use. The level and format come
from ``REGMIRROR_LOG_LEVEL`` and ``REGMIRROR_LOG_FORMAT`` (``text`` or ``json``), or the agent's flags.
"""

from __future__ import annotations

import datetime
import json
import logging

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "node", "message"}`` (and ``"error"`` with a traceback, if any)."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": self.node,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(node: str, log_format: str = "text", level: str = "INFO") -> None:
    """Send every log line to stderr in ``log_format``, naming ``node``."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(node))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s node={node} %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
