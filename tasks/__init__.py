"""Thin Prefect tasks, one per pipeline step.

Importing them loads the fast BLAS before anything imports mlx: the evaluate task runs MLX in the
flow's own process, which a deployment's worker starts without the farense command.
"""

from farense.model.blas import announce, ensure_fast_blas

announce(ensure_fast_blas())
