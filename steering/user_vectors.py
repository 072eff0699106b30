"""Per-user global steering vectors (the per-user steering baseline).

Each strategy maps one user's pairs -- differences ``diff = pos - neg`` and the mean
activations ``pos`` / ``neg`` (all ``[n, hidden]`` fp32) -- to one ``[hidden]`` vector:

* ``mean``: the mean difference.
* ``pca``: the first principal component of the differences taken with both signs
  (``{d_i} ∪ {-d_i}``, which is what random sign flips do in RepE-style PCA: the set is
  centred, so its top component is the top right-singular vector of the raw differences).
  Signed to agree with the mean and scaled to the mean's norm, so a multiplier means the
  same size of push as for ``mean``.
* ``logistic``: the weight direction of an L2-regularised logistic regression separating
  positive from negative activations (label 1 = positive), scaled to the mean's norm.
* ``centered``: the user's mean difference minus the average of every user's mean
  difference (each user once): what sets this user apart.  The part all users' pairs
  share (e.g. the format of the golds against the model's own answers) is removed, so it
  is the only strategy that looks at other users' pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from data_process.config import choose
from data_process.progress import tqdm


def mean_vector(diff: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The mean difference."""
    return diff.mean(0)


def _scaled(direction: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    norm = direction.norm()
    if norm == 0:
        return torch.zeros_like(mean)
    return direction / norm * mean.norm()


def pca_vector(diff: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """First principal component of the sign-symmetrised differences, sign-aligned with the mean."""
    mean = diff.mean(0)
    _, _, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    pc = vh[0].to(diff.dtype)
    if torch.dot(pc, mean) < 0:
        pc = -pc
    return _scaled(pc, mean)


def logistic_vector(diff: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, l2: float = 1.0,
                    steps: int = 200) -> torch.Tensor:
    """Direction of an L2-regularised logistic regression, positive vs negative activations."""
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    # Centring and one global scale leave the direction unchanged but condition the problem.
    x = x - x.mean(0)
    x = x / x.std().clamp(min=1e-12)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="sum")
        loss = loss + 0.5 * l2 * w.dot(w)  # sklearn's C = 1 / l2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return _scaled(w.detach().to(diff.dtype), diff.mean(0))


USER_STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "mean": mean_vector, "pca": pca_vector, "logistic": logistic_vector, "centered": mean_vector}
CENTERED = "centered"  # computed per user as the mean, then centred over users (see the module docstring)


def user_vectors(index: list[dict], acts: dict[str, dict[str, torch.Tensor]], strategies: list[str]
                 ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """``{strategy: {key: {user_id: [hidden]}}}`` from per-pair activations.

    ``acts[kind][key]`` is ``[n_pairs, hidden]`` for kind in diff, pos, neg, rows in
    ``index`` order.
    """
    fns = {name: choose("user-vector strategy", name, USER_STRATEGIES) for name in strategies}
    rows: dict[str, list[int]] = {}
    for i, record in enumerate(index):
        rows.setdefault(str(record["user_id"]), []).append(i)
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {s: {k: {} for k in acts["diff"]} for s in fns}
    for user, idx in tqdm(rows.items(), desc="user vectors", unit="user"):
        sel = torch.tensor(idx)
        for key in acts["diff"]:
            parts = [acts[kind][key][sel].float() for kind in ("diff", "pos", "neg")]
            for name, fn in fns.items():
                out[name][key][user] = fn(*parts)
    for by_user in out.get(CENTERED, {}).values():
        center = torch.stack(list(by_user.values())).mean(0)
        for user in by_user:
            by_user[user] = by_user[user] - center
    return out
