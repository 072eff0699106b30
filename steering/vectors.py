"""The vector store: per-pair steering vectors and per-user global vectors on disk.

Files (safetensors only; never pickle):

* ``vectors.safetensors`` -- one tensor per site key (``attn.15``, ``mlp.15``,
  ``block.15``), shape ``[n_pairs, hidden]``, rows in ``pairs.jsonl`` order.  The header
  metadata key ``fints`` holds JSON: model name, hidden size, layers, sites, keys, dtype,
  n_pairs, extraction settings, and the sha256 of the index file.
* ``vectors.index.json`` -- the rows: ``[{pair_id, user_id, sample_id, prompt, query}, ...]``
  (``query``, the task's query text of the pair's sample, is absent in stores made
  before pairs carried it).
* ``user_vectors.safetensors`` -- tensors named ``"<strategy>/<key>/<user_id>"`` (e.g.
  ``"pca/attn.15/u123"``), shape ``[hidden]``, same ``fints`` metadata.

Loading checks the metadata against the model that will be steered and refuses a
different model name or hidden size, or a key that was not extracted; every tensor's
shape against the index (one row per pair, no more, no fewer) and the hidden size; and
every value (NaN or Inf would silently break generation).  A truncated or corrupt file,
or a missing or malformed ``fints`` header, is an error naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_process.artifact_io import read_json, sha256_file, write_json
from steering.hooks import hidden_size
from steering.loading import model_name

VECTORS_FILE = "vectors.safetensors"
INDEX_FILE = "vectors.index.json"
USER_VECTORS_FILE = "user_vectors.safetensors"
FORMAT_VERSION = 1
INDEX_FIELDS = ("pair_id", "user_id", "sample_id", "prompt")
OPTIONAL_INDEX_FIELDS = ("query",)  # the task's query text of the pair's sample (pair retrieval)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fints": json.dumps(meta)})
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; vectors are ordinary artifacts
    os.replace(tmp, path)


META_FIELDS = {"model": str, "hidden_size": int, "keys": list, "dtype": str}  # every vector file's header
ROUTE = "re-run stage 04 (scripts/04_extract_vectors --overwrite)"
# Rows checked for NaN/Inf at a time: the store stays lazy, memory does not grow with it.
CHECK_ROWS = 4096


@contextmanager
def _open(path: Path) -> Iterator:
    """``safe_open`` whose failures (a truncated or corrupt file) name the file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (run `python -m scripts.04_extract_vectors` first)")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err}); {ROUTE}") from None
    with f:
        yield f


def _read_meta(path: Path, fields: dict[str, type] = META_FIELDS) -> dict:
    with _open(path) as f:
        raw = (f.metadata() or {}).get("fints")
    if raw is None:
        raise ValueError(f"{path}: not a Fints vector file (no 'fints' metadata in the safetensors header)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed 'fints' metadata ({err.msg}); {ROUTE}") from None
    for name, kind in fields.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise ValueError(f"{path}: 'fints' metadata field {name!r} missing or not {kind.__name__}; {ROUTE}")
    return meta


def _check_tensor(path: Path, name: str, tensor, shape: tuple[int, ...]) -> None:
    """``tensor`` (a safetensors slice) has ``shape`` and only finite values; else an error naming it."""
    got = tuple(tensor.get_shape())
    if got != shape:
        raise ValueError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                         f"({'rows of the index, ' if len(shape) == 2 else ''}hidden size); {ROUTE}")
    rows = shape[0] if len(shape) == 2 else 1
    for start in range(0, rows, CHECK_ROWS):
        part = tensor[start:start + CHECK_ROWS] if len(shape) == 2 else tensor[:]
        bad = (~torch.isfinite(part.float().reshape(-1, shape[-1]))).any(1).nonzero().flatten()
        if len(bad):
            where = f" in row {start + int(bad[0])}" if len(shape) == 2 else ""
            raise ValueError(f"{path}: tensor {name!r} holds NaN or Inf{where}; {ROUTE}")


def check_model(meta: dict, model, path: Path) -> None:
    """Refuse a model whose name or hidden size differs from the one vectors came from."""
    if model is None:
        return
    name, hidden = model_name(model), hidden_size(model)
    if meta["model"] != name:
        raise ValueError(f"{path}: vectors were extracted from model {meta['model']!r} but the loaded model is "
                         f"{name!r}; re-run stage 04 with --model pointing at this model")
    if meta["hidden_size"] != hidden:
        raise ValueError(f"{path}: vectors have hidden size {meta['hidden_size']} but the model has {hidden}")


def check_keys(meta: dict, keys: list[str] | None, path: Path) -> None:
    missing = [k for k in keys or [] if k not in meta["keys"]]
    if missing:
        raise ValueError(f"{path}: key(s) {missing} were not extracted; the file holds {meta['keys']} "
                         "(re-run stage 04 with --layers/--sites covering them)")


def save_vectors(out_dir: str | Path, tensors: dict[str, torch.Tensor], index: list[dict], meta: dict,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write ``vectors.safetensors`` and its index; returns the tensor file's path."""
    out_dir = Path(out_dir)
    rows = {t.shape[0] for t in tensors.values()}
    if rows != {len(index)}:
        raise ValueError(f"vector rows {sorted(rows)} do not match the index length {len(index)}")
    index = [{k: r[k] for k in INDEX_FIELDS + OPTIONAL_INDEX_FIELDS if k in r or k in INDEX_FIELDS} for r in index]
    write_json(out_dir / INDEX_FILE, index)
    meta = {**meta, "format_version": FORMAT_VERSION, "keys": sorted(tensors), "n_pairs": len(index),
            "dtype": str(dtype).removeprefix("torch."), "index_file": INDEX_FILE,
            "index_sha256": sha256_file(out_dir / INDEX_FILE)}
    path = out_dir / VECTORS_FILE
    _atomic_save({k: v.to(dtype) for k, v in tensors.items()}, path, meta)
    return path


def _resolve(path: str | Path, name: str) -> Path:
    path = Path(path)
    return path / name if path.is_dir() else path


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """``rows`` (ascending) as ``[start, stop)`` runs of consecutive row numbers."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


@dataclass
class VectorStore:
    """Per-pair vectors: ``.meta``, ``.index`` (rows), and the vectors themselves.

    A loaded store is lazy: it holds the metadata and the index, and :meth:`read` takes
    the rows it is asked for from the file (safetensors slices of the memory-mapped
    file), so a process's memory grows with the users it steers, not with the store.
    ``tensors`` (key -> ``[n_pairs, hidden]``) makes an in-memory store instead.
    """

    meta: dict
    index: list[dict]
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    path: Path | None = None
    selected: list[str] | None = None  # the keys a lazy store serves (``load``'s ``keys``)

    @classmethod
    def load(cls, path: str | Path, model=None, keys: list[str] | None = None) -> VectorStore:
        """Open a store (a vectors directory or its ``vectors.safetensors``), checking it
        against ``model`` (name, hidden size) and ``keys`` (must have been extracted).
        No vector is read until :meth:`read` or :meth:`get` asks for it."""
        path = _resolve(path, VECTORS_FILE)
        meta = _read_meta(path, {**META_FIELDS, "n_pairs": int, "index_file": str, "index_sha256": str})
        check_model(meta, model, path)
        check_keys(meta, keys, path)
        index_path = path.parent / meta["index_file"]
        index = read_json(index_path)
        if (not isinstance(index, list) or len(index) != meta["n_pairs"]
                or sha256_file(index_path) != meta["index_sha256"]):
            raise ValueError(f"{index_path} does not belong to {path} (row count or checksum differs); "
                             "re-run stage 04 with --overwrite")
        selected = list(keys or meta["keys"])
        with _open(path) as f:
            stored = set(f.keys())
            for key in selected:
                if key not in stored:
                    raise ValueError(f"{path}: tensor {key!r} is listed in the metadata but missing; {ROUTE}")
                _check_tensor(path, key, f.get_slice(key), (len(index), int(meta["hidden_size"])))
        return cls(meta, index, None, path, selected)

    @property
    def keys(self) -> list[str]:
        return list(self.tensors) if self.tensors is not None else list(self.selected or self.meta["keys"])

    @property
    def hidden_size(self) -> int:
        if self.tensors is not None and self.tensors:
            return next(iter(self.tensors.values())).shape[1]
        return int(self.meta["hidden_size"])

    def _check(self, key: str) -> None:
        if key not in self.keys:
            raise ValueError(f"{self.path}: key {key!r} not loaded; available {sorted(self.keys)}")

    def read(self, key: str, rows: list[int]) -> torch.Tensor:
        """``[len(rows), hidden]`` vectors of ascending store ``rows``, in the stored dtype;
        a lazy store reads just these rows from disk, one slice per run of consecutive rows."""
        self._check(key)
        if self.tensors is not None:
            return self.tensors[key][rows]
        with _open(self.path) as f:
            tensor = f.get_slice(key)
            parts = [tensor[start:stop] for start, stop in _runs(rows)]
        if not parts:
            return torch.zeros(0, self.hidden_size, dtype=getattr(torch, self.meta["dtype"]))
        # A slice is a view of the whole memory-mapped tensor: copy out just these rows.
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def get(self, key: str) -> torch.Tensor:
        """``[n_pairs, hidden]`` fp32 vectors of one site key (the whole tensor)."""
        self._check(key)
        if self.tensors is not None:
            return self.tensors[key].float()
        with _open(self.path) as f:
            return f.get_tensor(key).float()

    def rows_by_user(self) -> dict[str, list[int]]:
        """Row numbers of every user's pairs, in index order."""
        rows: dict[str, list[int]] = {}
        for i, record in enumerate(self.index):
            rows.setdefault(str(record["user_id"]), []).append(i)
        return rows


def save_user_vectors(out_dir: str | Path, vectors: dict[str, dict[str, dict[str, torch.Tensor]]],
                      meta: dict, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``{strategy: {key: {user_id: [hidden]}}}`` as ``user_vectors.safetensors``."""
    tensors, keys = {}, set()
    for strategy, by_key in vectors.items():
        for key, by_user in by_key.items():
            keys.add(key)
            for user, vec in by_user.items():
                tensors[f"{strategy}/{key}/{user}"] = vec.to(dtype)
    meta = {**meta, "format_version": FORMAT_VERSION, "keys": sorted(keys), "strategies": sorted(vectors),
            "dtype": str(dtype).removeprefix("torch.")}
    path = Path(out_dir) / USER_VECTORS_FILE
    _atomic_save(tensors, path, meta)
    return path


def load_user_vectors(path: str | Path, strategy: str, keys: list[str],
                      model=None) -> dict[str, dict[str, torch.Tensor]]:
    """``{user_id: {key: [hidden] fp32}}`` for one strategy (mean | pca | logistic)."""
    path = _resolve(path, USER_VECTORS_FILE)
    meta = _read_meta(path, {**META_FIELDS, "strategies": list})
    check_model(meta, model, path)
    check_keys(meta, keys, path)
    if strategy not in meta["strategies"]:
        raise ValueError(f"{path}: strategy {strategy!r} not stored; available {meta['strategies']}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    with _open(path) as f:
        for name in f.keys():
            s, key, user = (name.split("/", 2) + ["", ""])[:3]  # user ids may contain '/', keys never do
            if s == strategy and key in keys:
                _check_tensor(path, name, f.get_slice(name), (int(meta["hidden_size"]),))
                out.setdefault(user, {})[key] = f.get_tensor(name).float()
    return out
