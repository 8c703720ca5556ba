"""Constants shared across erm (defined once, imported everywhere)."""

IGNORE_INDEX = -100
"""Target id that marks a position with nothing to score (as in torch's cross-entropy)."""

MIN_TEMPERATURE = 1e-4
"""Smallest temperature α the ops accept. The kernels scale logits by 1/α in float32 after
centring each row on its max: with α ≥ 1e-4, 1/α ≤ 1e4 and (z − max)/α stays finite for any
logit gap below ~3e34, so every realistic row (and ±1e4 offsets) keeps finite statistics."""
