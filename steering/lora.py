"""Per-user LoRA adapters, the parametric personalization Fints is compared with (OPPU).

A training example is exactly what generation feeds the model -- ``chat_prompt`` of the
algorithm's user message -- followed by the gold answer and EOS, tokenized separately so
the answer boundary is exact (as in extraction).  The loss covers the answer tokens and
EOS only: the adapter learns how this user answers, not how prompts look.

:func:`train_adapter` wraps the frozen model with a fresh LoRA (or one started from a
shared base adapter), trains it with AdamW and returns the wrapped model;
:func:`save_adapter` writes it in PEFT's format (safetensors) and takes the LoRA layers
out again, so one loaded model serves every user in turn.
"""

from __future__ import annotations

import math
import random
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_process.progress import tqdm
from steering.inputs import chat_prompt

IGNORE = -100  # label of a token the loss skips (prompt, padding)


@dataclass
class LoraRecipe:
    """Adapter shape and optimisation; the defaults are OPPU's recipe."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 1e-4
    epochs: int = 2
    batch_size: int = 4

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")


@dataclass
class Example:
    """One tokenized training example: ``ids[:answer_start]`` is the prompt."""

    ids: list[int]
    answer_start: int


def encode_example(tok, message: str, answer: str, max_answer_tokens: int, response_prefix: str = "") -> Example:
    """The chat-formatted ``message`` followed by ``answer`` (cut to ``max_answer_tokens``) and EOS.

    With a task's ``response_prefix`` the prompt ends with it, as in generation, and the
    answer (which starts with it) continues after it.
    """
    context = tok(chat_prompt(tok, message, response_prefix), add_special_tokens=False)["input_ids"]
    if not answer.startswith(response_prefix):
        raise ValueError(f"answer {answer[:40]!r} does not start with the task's response prefix {response_prefix!r}")
    answer = answer[len(response_prefix):]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return Example(list(context) + list(answer_ids) + eos, len(context))


def collate(examples: Sequence[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt and padding ignored).

    Right padding keeps every real token at its natural position, which training needs
    (generation pads on the left instead, where the last prompt token matters).
    """
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        mask[row, :n] = 1
        labels[row, e.answer_start:n] = ids[row, e.answer_start:n]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the batch's answer tokens, and how many there are.

    Only the positions that predict an answer token go through the LM head
    (``logits_to_keep``): prompts are most of the tokens, and a vocabulary-sized head on
    every one of them is a fifth of a small model's compute.
    """
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE  # position p predicts token p + 1
    keep = scored.any(dim=0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    rows = scored[:, keep]
    loss = torch.nn.functional.cross_entropy(logits[rows].float(), labels[:, keep][rows], reduction="sum")
    return loss, int(scored.sum())


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths.

    Shuffle, sort each run of 8 batches' worth by length, cut, shuffle the batches: the
    order stays random while padding -- long, uneven prompts -- costs little (the idea of
    ``group_by_length`` in transformers' Trainer).
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = 8 * batch_size
    batches = []
    for start in range(0, len(order), span):
        group = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def mean_loss(model, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean loss per answer token of ``examples`` (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))  # little padding
    for start in range(0, len(order), batch_size):
        loss, n = answer_loss(model, collate([examples[i] for i in order[start:start + batch_size]], pad_id, device))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def train_adapter(model, examples: Sequence[Example], recipe: LoraRecipe, pad_id: int, *, seed: int,
                  init_from: str | Path | None = None, desc: str = "lora") -> tuple[object, list[float], dict]:
    """Wrap ``model`` with a trainable LoRA and fit it to ``examples``.

    Returns ``(peft_model, loss per epoch, tokens)``, each epoch's loss the mean per answer
    token of its batches as trained (dropout on); ``tokens`` counts the optimizer steps and
    the tokens they ran (:func:`step_tokens`).  ``init_from`` starts from a saved adapter
    instead of a fresh one.  Seeded: the LoRA init, the example order and dropout depend
    on ``seed`` alone, and the global RNG is left as it was.
    """
    from peft import PeftModel, get_peft_model

    if not examples:
        raise ValueError("no training examples")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if init_from is not None:
            wrapped = PeftModel.from_pretrained(model, Path(init_from), is_trainable=True)
        else:
            with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                wrapped = get_peft_model(model, recipe.peft_config())
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
        lengths = [len(e.ids) for e in examples]
        rng = random.Random(seed)
        wrapped.train()
        epoch_losses, done, padded, real = [], 0, 0, 0
        steps = recipe.epochs * math.ceil(len(examples) / recipe.batch_size)
        bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
        for _ in range(recipe.epochs):
            total, count = 0.0, 0
            for rows in length_grouped_batches(lengths, recipe.batch_size, rng):
                batch = collate([examples[i] for i in rows], pad_id, device)
                loss_sum, n = answer_loss(wrapped, batch)
                done, padded = done + 1, padded + batch["input_ids"].numel()
                real += sum(lengths[i] for i in rows)
                optimizer.zero_grad(set_to_none=True)
                (loss_sum / max(n, 1)).backward()
                optimizer.step()
                total, count = total + loss_sum.item(), count + n
                bar.update(1)
            epoch_losses.append(total / max(count, 1))
        bar.close()
    wrapped.eval()
    return wrapped, epoch_losses, step_tokens(done, padded, real)


def step_tokens(steps: int, padded: int, real: int) -> dict:
    """``steps`` optimizer steps that ran ``padded`` tokens (the batches' width times rows,
    what the model computes) of which ``real`` were not padding: the means per step."""
    return {"steps": steps, "padded_tokens_per_step": round(padded / max(steps, 1), 1),
            "tokens_per_step": round(real / max(steps, 1), 1)}


def save_adapter(wrapped, out_dir: str | Path):
    """Write the adapter to ``out_dir`` (PEFT format, safetensors) atomically; return the bare model.

    The adapter is written next to ``out_dir`` and renamed into place, so ``out_dir``
    either holds a whole adapter or does not exist.
    """
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    wrapped.save_pretrained(partial, safe_serialization=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return unload(wrapped)


def unload(wrapped):
    """Take the LoRA layers out of ``wrapped``; the frozen base model, as it was loaded."""
    model = wrapped.unload()
    if hasattr(model, "peft_config"):
        del model.peft_config  # a later get_peft_model would otherwise see stale adapters
    model.requires_grad_(False)
    return model
