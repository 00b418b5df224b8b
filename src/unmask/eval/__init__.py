"""Evaluation: likelihood bounds, generation quality, classification, exact match, lm-eval."""
