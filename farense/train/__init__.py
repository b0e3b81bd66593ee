"""The training engine: from a checked config to adapters, resumable at every checkpoint.

inputs (check_experiment: every check before heavy work; the resolved config file), data and
batching (mlx-lm's formats, the deterministic order), setup (model, adapters, optimizer), progress
(TrainingProgress: what a checkpoint holds to resume), loop (one iteration is one optimizer step),
finish, phases, runner (run_training: one training, locked, resumed, guarded), supervisor (training
as a watched child process), distributed (ranks over mlx.launch).

May import: farense.disk, farense.model, farense.run and the base modules.
"""
