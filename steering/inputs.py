"""What the model reads: prompts rendered through the chat template, batched with left padding.

Every stage renders prompts through :func:`chat_prompt` so that extraction sees exactly the
text generation will see, and batches token ids with :func:`left_pad` so that a row's last
real token sits at the same (last) position in every row.
"""

from __future__ import annotations

import torch


def chat_prompt(tokenizer, message: str, response_prefix: str = "") -> str:
    """Render one user message as the text the model continues.

    Uses the tokenizer's chat template (with the generation prompt) when it has one;
    otherwise a plain ``message\\n`` prompt.  The result includes any BOS the template
    writes, so callers tokenize it with ``add_special_tokens=False``.  ``response_prefix``
    (a task's start of every answer, e.g. ``{"name": "``) opens the assistant turn, so
    generation, pair collection and extraction all continue the same token stream.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                             tokenize=False, add_generation_prompt=True) + response_prefix
    bos = tokenizer.bos_token or ""
    return f"{bos}{message}\n{response_prefix}"


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)`` ``[len(rows), longest]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)
