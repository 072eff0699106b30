"""Train one LoRA adapter per seen user (the OPPU baseline; see stages/train_lora.py).

Usage:
    python -m scripts.train_lora --config configs/lamp4.json [--prompt rag|zeroshot] [--epochs 2] [--base true]
Then: python -m scripts.05_generate --config configs/lamp4.json --algo oppu (or oppu+fints)
"""

from data_process.cli import main
from stages.train_lora import TrainLoraConfig, run

if __name__ == "__main__":
    main(TrainLoraConfig, run)
