"""Stage 05: generate answers for a test split with one algorithm.

    python -m scripts.05_generate --config configs/lamp4.json --algo fints --split seen_test \
        --layers 15 --sites attn mlp --alpha 1 --beta 1 --top-k 5 --eval

``--algo zeroshot | rag | steer | fints``; ``--split`` names a file of {run_dir}/ranked/
(seen_test, unseen_test, seen_test_cluster2, ...).  Writes
{run_dir}/generations/{split}/{algo}{tag}/generations.jsonl (resumable) and a manifest;
``--eval`` scores it right away (stage 06).  ``--plugin DIR`` steers on top of per-user
LoRA adapters DIR/<user_id>/.
"""

from __future__ import annotations

from data_process.config import parse_config
from steering.runner import GenerateConfig, run_generation

if __name__ == "__main__":
    run_generation(parse_config(GenerateConfig, "generate"))
