"""Numerics: number formats, quantize/dequantize, and the matmul kernels that use them.

Data plane: imports torch, knows nothing of Ray or of sweeps.
"""
