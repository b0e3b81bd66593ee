"""farense: resumable, fault-tolerant, disk-guarded LoRA/QLoRA fine-tuning for MLX.

The core library never imports Prefect; `tasks/` and `flows/` assemble it.
"""

__version__ = "0.1.0"
