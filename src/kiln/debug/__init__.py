"""Accuracy tools: compare an engine with the model it came from."""
