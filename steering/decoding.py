"""Constrained decoding of tool calls: the model can only write a valid call.

A task with a ``call_schema`` (function name -> (argument name, ``"string"`` or
``"string_list"``)) and a ``response_prefix`` such as ``{"name": "`` is decoded through
:class:`ToolCallConstraint`: after the prefix the model picks one of the function names
(any spelling that is not a prefix of a name is masked), the fixed text
``", "arguments": {"<arg>": `` follows, then a JSON string or a list of JSON strings
(no quote, backslash or control character inside), then ``}}`` and EOS.  So every
generated call parses, and what the model still chooses -- the function and the
argument text -- is its own greedy (or sampled) choice among the valid continuations.

Why a small processor of our own and not a grammar library (lm-format-enforcer, xgrammar,
transformers-cfg): the grammar is three fixed shapes, and a library would be a new
dependency to keep working with the pinned torch and transformers for ~150 lines of
code.  The output is exactly :func:`eval.pwab_tools.format_tool_call`'s
canonical JSON (``json.dumps`` separators), so chosen/rejected texts of stage 03 and
generations of stage 05 have the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from steering.generation import eos_ids
from tasks import Task

ARG_KINDS = ("string", "string_list")
# What may follow a string's content: its closing quote and the call's end, or (in a list)
# the next item or the list's end.
_EXITS = {"string": ('"}}',), "string_list": ('", "', '"]}}')}
_ENDS = {"string": '"}}', "string_list": '"]}}'}  # the exit that ends the call


def _content_safe(piece: str) -> bool:
    return all(ch not in '"\\' and ord(ch) >= 32 and ch != "\ufffd" for ch in piece)


class ToolCallConstraint:
    """Vocabulary tables for one tokenizer and schema; :meth:`processor` makes a batch's processor.

    ``schema`` maps each function name to ``(argument name, kind)`` with kind in
    :data:`ARG_KINDS`.  The text being constrained is what follows the response prefix.
    """

    def __init__(self, tok, schema: dict[str, tuple[str, str]], eos_ids: list[int]):
        bad = {name: kind for name, (_, kind) in schema.items() if kind not in ARG_KINDS}
        if bad:
            raise ValueError(f"call schema: argument kinds {bad} are not among {list(ARG_KINDS)}")
        self.heads = {name: f'{name}", "arguments": {{"{arg}": ' + ('"' if kind == "string" else '["')
                      for name, (arg, kind) in schema.items()}
        self.kinds = {name: kind for name, (_, kind) in schema.items()}
        self.eos_ids = list(eos_ids)
        special = set(tok.all_special_ids)
        pieces = tok.batch_decode([[i] for i in range(len(tok))])
        self.pieces = [("" if i in special else p) for i, p in enumerate(pieces)]
        self.by_piece: dict[str, list[int]] = {}
        for i, piece in enumerate(self.pieces):
            if piece:
                self.by_piece.setdefault(piece, []).append(i)
        content = torch.tensor([bool(p) and _content_safe(p) for p in self.pieces])
        # Per argument kind and (string empty so far, token budget nearly spent): the tokens
        # that may follow inside a string.  A closing token is optional content then a
        # non-empty start of an exit; an empty string may not close.
        self.string_masks: dict[tuple[str, bool, bool], torch.Tensor] = {}
        for kind, exits in _EXITS.items():
            any_close, with_content = self._closing_masks(exits)
            end_any, end_with_content = self._closing_masks((_ENDS[kind],))  # near the budget: no new item
            for empty, close, end in ((False, any_close, end_any), (True, with_content, end_with_content)):
                self.string_masks[kind, empty, False] = content | close
                self.string_masks[kind, empty, True] = end
        self.eos_mask = torch.zeros(len(self.pieces), dtype=torch.bool)
        self.eos_mask[self.eos_ids] = True
        self._literal_masks: dict[tuple[str, ...], torch.Tensor] = {}  # few distinct states: cached

    def _closing_masks(self, exits: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(any closing token, closing tokens that carry content before the quote)."""
        any_close = torch.zeros(len(self.pieces), dtype=torch.bool)
        with_content = torch.zeros(len(self.pieces), dtype=torch.bool)
        for i, piece in enumerate(self.pieces):
            q = piece.find('"')
            if q >= 0 and _content_safe(piece[:q]) and any(e.startswith(piece[q:]) for e in exits):
                any_close[i] = True
                with_content[i] = q > 0
        return any_close, with_content

    def state(self, text: str) -> tuple[str, tuple[str, ...], str, int]:
        """Where ``text`` stands: (``literal`` | ``string`` | ``done`` | ``invalid``, the
        literal remainders or the string's exits, the argument kind, the string's length so far)."""
        rests = tuple(h[len(text):] for h in self.heads.values() if h.startswith(text) and len(h) > len(text))
        if rests:
            return "literal", rests, "", 0
        name = next((n for n, h in self.heads.items() if text.startswith(h)), None)
        if name is None:
            return "invalid", (), "", 0
        kind, rest = self.kinds[name], text[len(self.heads[name]):]
        while True:
            q = rest.find('"')
            if q < 0:
                return "string", _EXITS[kind], kind, len(rest)
            tail = rest[q:]
            full = next((e for e in _EXITS[kind] if tail.startswith(e)), None)
            if full == '", "':
                rest = tail[len(full):]  # the next list item starts
                continue
            if full is not None:
                return ("done" if tail == full else "invalid"), (), kind, 0
            partial = tuple(e[len(tail):] for e in _EXITS[kind] if e.startswith(tail))
            return ("literal", partial, kind, 0) if partial else ("invalid", (), kind, 0)

    def allowed(self, text: str, steps_left: int) -> torch.Tensor:
        """Bool mask over the vocabulary of the tokens that may follow ``text`` (do not modify it)."""
        where, rests, kind, length = self.state(text)
        if where == "string":
            # Leave room to close the call before the token budget runs out.
            return self.string_masks[kind, length == 0, steps_left <= max(map(len, rests)) + 1]
        if where != "literal":
            return self.eos_mask  # done or invalid: end the answer
        if kind and steps_left <= len(_ENDS[kind]) + 1:  # between list items: end the list, open no new one
            rests = tuple(r for r in rests if _ENDS[kind].endswith(r)) or rests
        if rests not in self._literal_masks:
            ids = [i for rest in rests for k in range(1, len(rest) + 1) for i in self.by_piece.get(rest[:k], [])]
            mask = torch.zeros(len(self.pieces), dtype=torch.bool)
            mask[ids] = True
            self._literal_masks[rests] = mask if ids else self.eos_mask
        return self._literal_masks[rests]

    def processor(self, prompt_width: int, max_new_tokens: int) -> Callable:
        """A logits processor for one batch whose padded prompts are ``prompt_width`` tokens."""
        return _BatchConstraint(self, prompt_width, max_new_tokens)


class _BatchConstraint:
    """Masks each row's logits to the grammar; keeps each row's generated text incrementally."""

    def __init__(self, constraint: ToolCallConstraint, prompt_width: int, max_new_tokens: int):
        self.c, self.start, self.max_new = constraint, prompt_width, max_new_tokens
        self.texts: list[str] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n_new = input_ids.shape[1] - self.start
        if not self.texts:
            self.texts = [""] * input_ids.shape[0]
        if n_new:
            for r, token in enumerate(input_ids[:, -1].tolist()):
                self.texts[r] += self.c.pieces[token] if token < len(self.c.pieces) else ""
        masks = torch.stack([self.c.allowed(t, self.max_new - n_new) for t in self.texts]).to(scores.device)
        if masks.shape[1] < scores.shape[1]:  # the model's vocabulary may be padded past the tokenizer's
            masks = torch.nn.functional.pad(masks, (0, scores.shape[1] - masks.shape[1]))
        return scores.masked_fill(~masks[:, :scores.shape[1]], float("-inf"))


def decoding_kwargs(task: Task, model, tok, constrained: bool | None = False) -> dict:
    """:func:`steering.generation.generate_batches` keyword arguments that decode ``task``'s
    answers: its response prefix and, when ``constrained``, a :class:`ToolCallConstraint`."""
    kwargs: dict = {"response_prefix": task.response_prefix}
    if constrained:
        if task.call_schema is None:
            raise ValueError(f"--constrained: task {task.name!r} has free-text answers "
                             "(no call schema to constrain to)")
        kwargs["constraint"] = ToolCallConstraint(tok, task.call_schema, eos_ids(model, tok)).processor
    return kwargs
