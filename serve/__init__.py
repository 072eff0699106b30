"""The per-user steering server: OpenAI-compatible HTTP endpoints over stage 05's algorithms.

``settings`` (the config), ``requests`` (what a client may send, validated), ``history``
(users' RAG source), ``runtime`` (model, vectors, algorithms; a request -> a batch row),
``engine`` (one steered batch), ``scheduler`` (batching across users), ``app`` (FastAPI),
``server`` (``run(cfg)``: load and listen).  See docs/serving.md.
"""
