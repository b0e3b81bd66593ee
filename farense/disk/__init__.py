"""The disk: the estimate of what a run writes, the preflight before it, the guard during it, cleanup after.

estimate, preflight, diskguard (watermarks, hysteresis), cleanup (plan and apply, dry run by default).

May import: farense.model, farense.run and the base modules.
"""
