"""Periodic retraining job for stream-l2ae: window, train, gate, publish."""
