"""The disk: the estimate of what a run writes, the preflight before it, the guard during it, cleanup after.

estimate, preflight, diskguard (watermarks, hysteresis), cleanup (plan and apply, dry run by default),
remote_cleanup (the same retention on the object store, never a run whose lease is live).

May import: farense.model, farense.run and the base modules.
"""
