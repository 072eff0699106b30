"""The server's settings (config sections ``generate`` then ``serve``; flags override both).

:class:`ServeConfig` is stage 05's :class:`GenerateConfig` -- the generation defaults every
request starts from, so a request with no overrides is answered as ``05_generate`` would
with the same config -- plus where to listen, how requests are batched, and the limits that
keep one client from starving the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.generate import GenerateConfig

UNKNOWN_USER = ("reject", "zeroshot")


@dataclass
class ServeConfig(GenerateConfig):
    """``python -m scripts.serve`` settings: 05's generation defaults + the HTTP server's."""

    STAGE = "serve"
    SECTIONS = (*GenerateConfig.SECTIONS, "serve")

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface; "
                                                             "then set --api-key-file)"})
    port: int = field(default=8000, metadata={"min": 1, "max": 65535, "help": "TCP port"})
    api_key_file: str = field(default="", metadata={"help": "file holding the API key clients send as "
                                                            "'Authorization: Bearer KEY' ('': no key)"})
    served_name: str = field(default="", metadata={"help": "model id of /v1/models and responses "
                                                           "(default: the model directory's name)"})
    batch_window_ms: float = field(default=50.0, metadata={"min": 0, "max": 10000, "help": "how long the first "
                                                           "queued request waits for others to share its batch"})
    max_batch_size: int = field(default=16, metadata={"min": 1, "help": "rows per steered generation batch"})
    max_queue: int = field(default=64, metadata={"min": 1, "help": "requests waiting for a batch; more get 503"})
    request_timeout_s: float = field(default=120.0, metadata={"gt": 0, "help": "seconds a request may wait and "
                                                              "run before it gets 504"})
    max_body_bytes: int = field(default=1_000_000, metadata={"min": 1024, "help": "largest request body (413 above)"})
    max_tokens_limit: int = field(default=512, metadata={"min": 1, "help": "largest max_tokens a request may ask"})
    max_input_tokens: int = field(default=2048, metadata={"min": 1, "help": "largest prompt in tokens, chat "
                                                          "template included (a longer one gets 400)"})
    max_connections: int = field(default=64, metadata={"min": 1, "help": "concurrent connections (uvicorn "
                                                       "answers 503 above)"})
    unknown_user: str = field(default="reject", metadata={
        "help": "a user the run does not know: reject (404 naming the id) or zeroshot (the unpersonalized "
                "answer, with the response header x-fints-fallback)", "choices": list(UNKNOWN_USER)})
    history_splits: list[str] = field(default_factory=lambda: ["seen_test", "unseen_test", "seen_val", "train"],
                                      metadata={"name": True, "non_empty": True, "help": "stage-01 files of "
                                                "{run_dir}/data/ a user's history (the RAG source) comes from: "
                                                "the first that has the user, its sample with the most history"})
    use_tuned: bool = field(default=True, metadata={"help": "start steer/fints requests from {run_dir}/tune/"
                                                            "tune.json's chosen settings when it exists"})
    cache_mb: float = field(default=256.0, metadata={"gt": 0, "help": "MB of users' pair vectors kept in "
                                                     "memory per loaded vector configuration"})
    threads: int = field(default=0, metadata={"min": 0, "help": "torch CPU threads (0: torch's default)"})
