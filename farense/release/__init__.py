"""Releases: evaluation, the decision by the seed's rules, promotion to production, the V1/V2 campaign table.

evaluation (test loss, generated answers, F1), textmetrics, decision, promotion (atomic, reversible),
campaign.

May import: farense.train, farense.disk, farense.model, farense.run and the base modules.
"""
