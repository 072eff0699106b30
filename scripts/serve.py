"""Serve a finished run: OpenAI-compatible endpoints that personalize every request for its user.

Usage:
    python -m scripts.serve --config configs/demo.json --run-dir runs/demo --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "smollm2-135m-instruct", "user": "<user id>", "prompt": "<task input>"}'

Settings: stage 05's (config section ``generate``) as every request's defaults, then
section ``serve`` and flags (see serve/settings.py, docs/serving.md).
"""

from data_process.cli import main
from serve.server import run
from serve.settings import ServeConfig

if __name__ == "__main__":
    main(ServeConfig, run)
