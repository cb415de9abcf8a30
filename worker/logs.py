"""One JSON object per log line (python-json-logger). Records carry ids and codes in `extra`;
message content, prompts and secrets are never logged at INFO."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s",
                                       rename_fields={"levelname": "level", "name": "logger"},
                                       timestamp="ts"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries log request URLs (with keys in query strings) at INFO: keep them quieter.
    for noisy in ("httpx", "httpcore", "websockets", "realtime", "hpack", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
