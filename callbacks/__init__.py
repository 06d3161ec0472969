"""Callbacks: answer files, pruning-ratio sweeps (accuracy vs FLOPs), timing."""
