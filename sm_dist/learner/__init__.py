"""Learner: the pure-torch step and its inputs (`step.py`), the rank class (`learner.py`; its model loaded and
wrapped in `model.py`, what else runs in its process in `calls.py`), run checkpoints (`checkpoint.py`), LoRA
(`lora.py`), sharded state (`sharded.py`), and `sm-dist export` (`export.py`: a run merged into an HF folder)."""
