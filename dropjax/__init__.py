"""dropjax: Dropping Pixels for Adversarial Robustness, in JAX/Flax.

Reimplementation of Hosseini, Kannan and Poovendran, "Dropping Pixels for
Adversarial Robustness" (CVPR Workshops 2019).
"""
from dropjax import backend as _backend

_backend.configure_xla_flags()
_backend.configure_host_allocator()

__version__ = "0.1.0"
