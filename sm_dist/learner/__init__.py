"""Learner: the pure-torch step (`step.py`), the rank class (`learner.py`), run checkpoints (`checkpoint.py`)."""
