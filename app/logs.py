"""The service's logs on stderr: `charrnn` as plain lines, `charrnn.access` as one JSON object per line.

uvicorn configures only its own loggers, and its access log is turned off by `charrnn serve` in favour of
ours, which carries the request id and the client (app/middleware.py `AccessLog`).
"""

from __future__ import annotations

import logging
import sys


def configure_logging(access_log: bool) -> None:
    service = logging.getLogger("charrnn")
    if not service.handlers:  # once per process, however many apps are created
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        service.addHandler(handler)
        service.setLevel(logging.INFO)
        service.propagate = False
    access = logging.getLogger("charrnn.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.propagate = False
    access.setLevel(logging.INFO if access_log else logging.WARNING)
