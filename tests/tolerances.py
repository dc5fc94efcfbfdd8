"""Tolerances derived from floating-point error bounds, for the runner and
kernel tests that compare attention outputs with a float32 reference
computed from the same (already rounded) inputs.

Attention output = sum_i p_i v_i with p = softmax(scale * q.k): a convex
combination of values, so |out| <= max|v|. With unit roundoff u:

* A sum of n terms computed in any order is off by at most
  gamma_n = n u / (1 - n u) ~ n u times the sum of the terms' magnitudes
  (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 3.1).
  The weighted sum of values and the softmax normaliser are each such a sum
  over the n keys of a query: 2 n u max|v|.
* A logit is a d-term dot product, off by at most d u scale sum_j |q_j k_j|;
  a logit error delta scales a weight by at most e^(2 delta) ~ 1 + 2 delta
  after normalisation, moving the output by at most 2 delta max|v|.
* bf16 results: the output is rounded to bf16 (half an ulp, 2^-9 relative)
  and a kernel may round the probabilities to bf16 before the weighted sum
  (2^-9 relative each, <= 2^-9 max|v| in all): 2 * 2^-9 max|v| on top.
"""

from __future__ import annotations

import torch

U_FP32 = 2.0**-24  # float32 unit roundoff
U_BF16 = 2.0**-9  # bf16 unit roundoff (8 significand bits)


def attention_atol(dtype: torch.dtype, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   max_keys: int, scale: float) -> float:
    """Absolute tolerance for attention outputs over at most ``max_keys``
    keys per query, against float32 on the same inputs (see the module
    docstring). ``keys``/``values``: every key/value any query may read."""
    vmax = float(_finite(values).abs().max())
    d = query.shape[-1]
    tol = U_FP32 * vmax * (2 * max_keys + 2 * d * scale * dot_bound(query, keys))
    if dtype == torch.bfloat16:
        tol += 2 * U_BF16 * vmax
    return tol


def dot_bound(query: torch.Tensor, keys: torch.Tensor) -> float:
    """Largest sum_j |q_j k_j| over every (query row, key row) of the last
    dimension, heads ignored (an upper bound for any pairing); NaN
    (poisoned) entries count as 0."""
    d = query.shape[-1]
    return float((_finite(query).abs().reshape(-1, d) @ _finite(keys).abs().reshape(-1, d).T).max())


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x.float(), nan=0.0)
