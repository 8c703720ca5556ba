"""Constants shared across erm (defined once, imported everywhere)."""

IGNORE_INDEX = -100
"""Target id that marks a position with nothing to score (as in torch's cross-entropy)."""
