"""dropjax: Dropping Pixels for Adversarial Robustness, in JAX/Flax.

Reimplementation of Hosseini, Kannan and Poovendran, "Dropping Pixels for
Adversarial Robustness" (CVPR Workshops 2019).  Importing the package changes
nothing in the process; entry points call
:func:`dropjax.backend.configure_process` and :func:`dropjax.backend.resolve`
(see :mod:`dropjax.backend`).
"""
__version__ = "0.2.0"
