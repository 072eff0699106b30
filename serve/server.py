"""``run(cfg)``: load the run's model, vectors and histories, then serve them over HTTP (uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path

from serve.settings import ServeConfig

log = logging.getLogger(__name__)


def read_api_key(path: str) -> str:
    """The API key in ``path`` (surrounding whitespace dropped); '' when no file is set."""
    if not path:
        return ""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--api-key-file {file}: no such file")
    key = file.read_text(encoding="utf-8").strip()
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"--api-key-file {file}: the file must hold one key without spaces")
    return key


def run(cfg: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests are answered before the process exits."""
    import uvicorn

    from serve.app import create_app
    from serve.runtime import Runtime, set_threads

    key = read_api_key(cfg.api_key_file)
    if not key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("[serve] listening on %s without --api-key-file: anyone who reaches this port can use it",
                    cfg.host)
    set_threads(cfg.threads)
    runtime = Runtime(cfg)
    app = create_app(runtime, key)
    log.info("[serve] %s, task %s, %d users, algorithms %s: http://%s:%d/v1", runtime.name, runtime.task.name,
             len(runtime.users), runtime.algos, cfg.host, cfg.port)
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.host, port=cfg.port, limit_concurrency=cfg.max_connections, log_config=None,
        log_level=cfg.log_level.lower(), timeout_graceful_shutdown=int(cfg.request_timeout_s) + 5))
    server.run()
