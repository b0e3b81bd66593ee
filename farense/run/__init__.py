"""Run files and their stores: layout, atomic writes, locks, run state, checkpoints, metrics, the object-store mirror."""
