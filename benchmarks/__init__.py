"""Reproducible benchmarks that print ratios measured side by side in one run (JSON out).

Top layer (beside ``fedcbir``): may import every package but ``fedcbir``; nothing imports it.
"""
