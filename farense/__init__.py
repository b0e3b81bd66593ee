"""farense: resumable, fault-tolerant, disk-guarded LoRA/QLoRA fine-tuning for MLX.

The core library never imports Prefect; `tasks/` and `flows/` assemble it. Its layers, lowest
first (a module imports its own layer and those below; tests/test_architecture.py holds it):

    base      codes, errors, config, overfitting, console, signals, faults (this folder)
    run       run files and their stores
    model     base models, GGUF, BLAS, the demo models
    disk      estimate, preflight, guard, cleanup
    train     the training engine
    release   evaluation, decision, promotion
    observe   monitor, status
    commands  the `farense` command (with cli.py)
"""

__version__ = "0.1.0"
