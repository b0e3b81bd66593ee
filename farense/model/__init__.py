"""Base models: GGUF import, what a quantized base computes in, the CPU's BLAS, mlx-lm's formats, the demo models.

gguf, compute, blas (+ _blas_shim.c), mlxlm_compat (config import, export, fuse), demo (the tiny
random model and the shipped data), smollm2 (the real demo model), demos (which one an overlay names).

May import: farense.run and the base modules.
"""
