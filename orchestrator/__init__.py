"""Control plane: configs, sweep expansion and validation, Ray launching, MLflow tracking.

Imports no torch, triton or vllm: those live in the data plane (``jobs``, ``kernels``).
"""

__version__ = "0.1.0"
