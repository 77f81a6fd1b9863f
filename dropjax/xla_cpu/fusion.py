"""An identity that XLA cannot fuse through (a workaround for XLA:CPU).

In a training step XLA:CPU computes each convolution's weight gradient from a
channel-major *transposed* copy of the convolution's input.  Without a
barrier, XLA fuses the whole chain of elementwise ops that produced that
input (batch norm, ReLU and residual additions, back to the start of a stage)
into the transpose, and the transpose then reads a dozen tensors in a
cache-hostile order: on the 2-core development machine those transposes took
~40% of a ResNet-20 train step (``benchmarks/README.md``, profile section).
Routing the convolution input through a ``lax.cond`` whose predicate XLA
cannot evaluate at compile time makes the transpose read the one tensor that
is already in memory (those transposes fell from 389 to 76 ms per step).
``lax.optimization_barrier`` in the same place made no difference in our measurements.

:func:`dropjax.backend.resolve` also hands the model :func:`fusion_barrier` as
its ``block_input`` (applied to each residual block's input): otherwise XLA:CPU
recomputes the residual stream's chain inside every non-convolution consumer
(the shortcut addition, the backward pass).  A barrier only changes fusion decisions, so
float32 results may differ in the last bits (an FMA rounds once).
"""
from __future__ import annotations

import jax
from jax import lax


def fusion_barrier(x: jax.Array, witness: jax.Array | None = None) -> jax.Array:
  """Returns ``x`` unchanged, as the output of an unfusible conditional.

  Args:
    x: any array.
    witness: a small array whose first element decides the (always equal)
      branches at run time; default ``x`` itself.  A convolution passes its
      (replicated) kernel, which needs no communication when ``x`` is sharded.
  """
  w = (x if witness is None else witness).reshape(-1)[0]
  return lax.cond(w == w, lambda v: v, lambda v: v + 0, x)  # either branch returns x's values
