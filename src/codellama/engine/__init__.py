"""The serving engine: fast prefill/decode steps, continuous batching, weight-only quantisation.

Wraps the model from outside; nothing here changes what the model computes, only how fast.
"""
