"""Steering: model loading and layer discovery, hooks, generation, extraction, vectors, algorithms."""

import os

# Offline by default: models load from local directories.  Set here, on the package, so it
# holds before any steering module (or transformers, which reads it at import) is loaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
