"""Foveated VLM family: glimpse model, passes, loss and inference (model.py), pass metrics (metrics.py)."""
