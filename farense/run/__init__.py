"""Run files and their stores: everything a run leaves on disk, and the one owner of each file.

layout (file names), fsutil (whole-or-nothing writes), locks (flock), runstate (RunState's file,
RunRecorder: the one writer of run_state.json), checkpoint (CheckpointStore: write, verify, list,
retain, quarantine), metrics, summary (training_summary.json), outcome (how a training ended),
plots (loss curves).

May import: the base modules (farense.codes, errors, config, overfitting, console, signals, faults).
"""
