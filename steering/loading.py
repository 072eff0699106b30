"""Model and tokenizer loading: local directories only, device and dtype chosen one way.

Every stage loads models through :func:`load_model` so device, dtype and padding are set
the same way everywhere.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from steering.layers import find_layers, parse_layout

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

log = logging.getLogger(__name__)

# x86 CPU flags of native half-precision matrix arithmetic (Linux /proc/cpuinfo names).
HALF_PRECISION_FLAGS = {"amx_bf16", "avx512_bf16", "amx_fp16", "avx512_fp16"}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def slow_half_precision_warning(dtype: torch.dtype, device: torch.device,
                                cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """Why bf16/fp16 on this CPU is likely slow, or ''.

    On an x86 CPU with bf16 matrix units (AMX, AVX512-BF16) bf16 prefills ~3x and decodes
    batches ~1.8x faster than fp32 (benchmarks/bench_decode.py), which is why the shipped
    configs ask for it; without them torch falls back to kernels that are usually slower than fp32's.
    Only Linux says which CPU this is (``cpuinfo``); elsewhere nothing is claimed.
    """
    path = Path(cpuinfo)
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or not path.is_file():
        return ""
    flags = {f for line in path.read_text(errors="replace").splitlines() if line.startswith("flags")
             for f in line.split(":", 1)[1].split()}
    if not flags or flags & HALF_PRECISION_FLAGS:
        return ""
    return (f"{dtype} on a CPU without bf16/fp16 matrix instructions ({', '.join(sorted(HALF_PRECISION_FLAGS))}) "
            "runs on slow fallback kernels: pass --dtype float32 (outputs differ slightly from bf16 runs)")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Tokenizer set up for batched decoder-only generation: left padding, a pad token."""
    from transformers import AutoTokenizer

    path = _local_dir(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"  # generated tokens must follow the prompt's last real token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, layers_attr: str = ""):
    """Load a causal LM and its tokenizer from a local directory, in eval mode.

    Returns ``(model, tokenizer)``.  The model is frozen (``requires_grad=False``).
    ``layers_attr`` (``"path[:attn[:mlp[:attn_norm[:mlp_norm]]]]"``, see :func:`parse_layout`)
    tells :func:`find_layers` where the decoder layers and sites of an architecture it does
    not know are; it is checked here.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # its weight-loading bar would be carriage returns in a log file
        hf_logging.disable_progress_bar()
    path = _local_dir(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    warning = slow_half_precision_warning(torch_dtype, dev)
    if warning:
        log.warning(warning)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    model.to(dev).eval()
    model.requires_grad_(False)
    tok = load_tokenizer(path, trust_remote_code)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if layers_attr:
        model.fints_layout = parse_layout(layers_attr)
        find_layers(model)  # a wrong path fails now, naming what it looked for
    return model, tok


def model_name(model) -> str:
    """A stable name for a model: its directory name (used in vector metadata)."""
    return Path(str(model.config.name_or_path)).name


def _local_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        hint = " Run `bash scripts/setup.sh` to build the default models." if "models" in path.parts else ""
        raise FileNotFoundError(f"model directory {path} has no config.json (models load from local "
                                f"directories only; the hub is offline).{hint}")
    return path
