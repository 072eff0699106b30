"""What a client may send: the OpenAI request bodies, the ``fints`` object, and their checks.

Bodies are validated strictly (pydantic, no type coercion, finite numbers, unknown fields
refused) and every problem becomes an :class:`ApiError` in OpenAI's error shape naming the
field (``param``).  The ``fints`` object's settings are stage 05's: each is checked by the
same rule as the CLI flag of that name (:func:`data_process.config.value_problem` on the
:class:`GenerateConfig` field), so a value the CLI refuses is refused here with the same
words.  :data:`OVERRIDES` is the one place request keys meet config fields.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_process.config import suggest, value_problem
from stages.generate import GenerateConfig

# ``fints`` keys a request may set -> the GenerateConfig field each overrides (and whose
# validation rule it follows).  Nothing here names a file or a directory: a request can
# only choose among what the run directory already holds.
OVERRIDES: dict[str, str] = {
    "algo": "algo", "history_k": "history_k", "max_prompt_tokens": "max_prompt_tokens",
    "layers": "layers", "sites": "sites", "alpha": "alpha", "beta": "beta", "multipliers": "multipliers",
    "positions": "positions", "vec_strategy": "vec_strategy", "top_pairs": "top_pairs",
    "pair_weighting": "pair_weighting", "softmax_temperature": "softmax_temperature", "retriever": "retriever",
}
# The per-call settings of a loaded fints aggregator (attributes named as the GenerateConfig
# fields): a request may change them without reloading the user's pairs.
AGGREGATOR_KNOBS = ("top_pairs", "pair_weighting", "softmax_temperature")
# Besides the overrides: the prompt mode, and task mode's extra sample fields (PersonalWAB's
# request type, target product, ...: the task's record fields).
FINTS_KEYS = (*OVERRIDES, "mode", "fields")
MODES = ("task", "chat")
_FIELDS = {f.name: f for f in dataclasses.fields(GenerateConfig)}
_HINTS = typing.get_type_hints(GenerateConfig)


class ApiError(Exception):
    """A request's failure as OpenAI reports one: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    @property
    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_overloaded", 504: "timeout"}.get(self.status, "invalid_request_error")
        if self.status >= 500 and self.status not in (503, 504):
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields both endpoints share; OpenAI fields with no effect here accept only their neutral value."""

    model: str
    user: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[False] | None = None
    fints: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings", "stop")
        return stops


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: Literal[False] = False

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"prompt: give one prompt (got a list of {len(self.prompt)}); send one request "
                                "each, they are batched together", "prompt")
        return self.prompt[0]


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def validate(model: type[_Strict], body: dict[str, Any]) -> Any:
    """``body`` as ``model``; the first problem as a 400 naming its field."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            known = [name for name in model.model_fields]
            message = f"unknown field {param!r}.{suggest(str(first['loc'][-1]), known)}"
        elif first["type"] == "literal_error" and first["loc"][0] in ("n", "presence_penalty", "frequency_penalty",
                                                                       "logprobs", "echo"):
            message = f"{param}: not supported by this server ({first['msg']})"
        else:
            message = f"{param}: {first['msg']}" + (f", got {first['input']!r}" if "input" in first else "")
        raise ApiError(400, message, param, code="invalid_value") from None


def fints_options(fints: dict[str, Any] | None, default_mode: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(mode, config overrides by GenerateConfig field, task-mode sample fields)`` of a
    request's ``fints`` object, each value checked by the CLI's rule for that setting."""
    fints = dict(fints or {})
    for key in fints:
        if key not in FINTS_KEYS:
            raise ApiError(400, f"unknown field 'fints.{key}'.{suggest(key, FINTS_KEYS)} "
                                f"The fints object takes {list(FINTS_KEYS)}", f"fints.{key}", "invalid_value")
    mode = fints.pop("mode", default_mode)
    if mode not in MODES:
        raise ApiError(400, f"fints.mode: {mode!r} is not one of {list(MODES)}", "fints.mode", "invalid_value")
    fields = fints.pop("fields", {}) or {}
    if not isinstance(fields, dict):
        raise ApiError(400, f"fints.fields must be an object of sample fields, got {fields!r}", "fints.fields",
                       "invalid_value")
    overrides = {}
    for key, value in fints.items():
        name = OVERRIDES[key]
        problem = value_problem(_FIELDS[name], _HINTS[name], value)
        if problem:
            raise ApiError(400, f"fints.{key}: {problem}", f"fints.{key}", "invalid_value")
        overrides[name] = value
    return mode, overrides, fields


# tune/tune.json's chosen points -> GenerateConfig fields (stages/tune.py's _point_cfg):
# which point each algorithm starts from, and how a point reads as settings.
TUNED_FROM = {"steer": "steer", "fints": "fints", "oppu+fints": "fints"}


def tuned_settings(point: dict[str, Any]) -> dict[str, Any]:
    """The GenerateConfig fields a chosen tune.json point sets."""
    from stages.tune import SITE_SETS

    out = {"layers": [point["layer"]], "sites": SITE_SETS[point["sites"]], "multipliers": [point["multiplier"]]}
    if "top_pairs" in point:
        out.update(top_pairs=point["top_pairs"], softmax_temperature=point["temperature"])
    return out
