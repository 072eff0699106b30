"""Serve a finished run: OpenAI-compatible endpoints that personalize every request for its user.

Usage:
    python -m scripts.serve --config configs/demo.json --run-dir runs/demo --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "smollm2-135m-instruct", "user": "<user id>", "prompt": "<task input>"}'

Settings: stage 05's (config section ``generate``) as every request's defaults, then
section ``serve`` and flags (see serve/settings.py, docs/serving.md).
"""

import os

# Ranking a user's history runs per request: its progress bar would print once per request.
os.environ.setdefault("TQDM_DISABLE", "1")

from data_process.cli import main  # noqa: E402 -- after the environment it reads
from serve.server import run  # noqa: E402
from serve.settings import ServeConfig  # noqa: E402

if __name__ == "__main__":
    main(ServeConfig, run)
