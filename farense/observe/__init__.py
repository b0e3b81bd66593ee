"""Observation: the live monitor of one run and the status table of all runs and production.

May import: every package below it (release, train, disk, model, run) and the base modules.
"""
