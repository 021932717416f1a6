"""Each paper's central claim as a test: the direction of the effect, with a margin well outside the seed
spread measured at the same small scale, and the data-only baselines the models must beat.

A learner who changes a paper file runs `pytest tests/test_claims.py`: a broken phenomenon fails here even
when every oracle and smoke test still passes. Each test's docstring states the scale, the measured values
over seeds and the margin chosen from them.
"""
