"""Learner: the pure-torch step (`step.py`), the rank class (`learner.py`), run checkpoints (`checkpoint.py`),
LoRA (`lora.py`), sharded state (`sharded.py`), and `sm-dist export` (`export.py`: a run merged into an HF folder)."""
