"""Training of the SASRec recommender (:mod:`eval.sasrec`) on users' purchase sequences.

A training step of its own (stage ``train_sasrec``), kept apart from the model so that the
evaluation layer holds only what the tool environment needs at inference time.  Training
uses binary cross-entropy of the true next item against one sampled negative per position.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from data_process.progress import tqdm
from eval.sasrec import SASRec, SASRecConfig


def encode_sequences(sequences: list[list[str]], item_ids: list[str]) -> list[list[int]]:
    """Asin sequences as item indices (``item_ids[i]`` is index i+1); unknown asins are dropped."""
    index = {asin: i + 1 for i, asin in enumerate(item_ids)}
    return [[index[a] for a in seq if a in index] for seq in sequences]


def _windows(seqs: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-item targets, left padded, from each sequence's last max_len+1 items."""
    inputs, targets = [], []
    for s in seqs:
        s = s[-(max_len + 1):]
        pad = [0] * (max_len + 1 - len(s))
        inputs.append(pad + s[:-1])
        targets.append(pad + s[1:])
    return torch.tensor(inputs), torch.tensor(targets)


def _negatives(targets: torch.Tensor, user_items: list[set[int]], num_items: int, rng: random.Random) -> torch.Tensor:
    """One item per target position that the user never had (uniform)."""
    neg = torch.zeros_like(targets)
    for r, items in enumerate(user_items):
        for c in torch.nonzero(targets[r]).flatten().tolist():
            candidate = rng.randint(1, num_items)
            while candidate in items and len(items) < num_items:
                candidate = rng.randint(1, num_items)
            neg[r, c] = candidate
    return neg


def train_sasrec(sequences: list[list[str]], cfg: SASRecConfig | None = None, *, epochs: int = 20,
                 batch_size: int = 128, lr: float = 1e-3, seed: int = 42, device: str = "cpu",
                 **config_fields) -> tuple[SASRec, list[str], list[float]]:
    """Train on users' asin sequences (time order).  Returns (model, item_ids, loss per epoch)."""
    item_ids = sorted({a for s in sequences for a in s})
    cfg = cfg or SASRecConfig(num_items=len(item_ids), **config_fields)
    cfg.num_items = len(item_ids)
    seqs = [s for s in encode_sequences(sequences, item_ids) if len(s) >= 2]
    if not seqs:
        raise ValueError("SASRec needs at least one user with two or more behaviours")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = SASRec(cfg).to(device)
    inputs, targets = _windows(seqs, cfg.max_len)
    user_items = [set(s) for s in seqs]
    optim = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    bce = nn.BCEWithLogitsLoss(reduction="none")
    losses = []
    bar = tqdm(range(epochs), desc="SASRec epochs")
    for _ in bar:
        model.train()
        order = torch.randperm(len(seqs)).tolist()
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            seq, pos = inputs[rows].to(device), targets[rows].to(device)
            neg = _negatives(targets[rows], [user_items[r] for r in rows], cfg.num_items, rng).to(device)
            hidden = model(seq)
            pos_logit = (hidden * model.item_emb(pos)).sum(-1)
            neg_logit = (hidden * model.item_emb(neg)).sum(-1)
            mask = (pos != 0).float()
            loss = ((bce(pos_logit, torch.ones_like(pos_logit)) + bce(neg_logit, torch.zeros_like(neg_logit)))
                    * mask).sum() / mask.sum()
            optim.zero_grad()
            loss.backward()
            optim.step()
            total, count = total + loss.item() * len(rows), count + len(rows)
        losses.append(total / count)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return model.eval(), item_ids, losses
