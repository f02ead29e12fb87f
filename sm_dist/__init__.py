"""sm-dist: SequenceMatch finetuning at cluster scale (Ray + vLLM + Arrow + torch)."""

__version__ = "0.1.0"
