"""Checkpoint -> device bundle (TFLite / ONNX / ExecuTorch) with verified parity.

Layer 3: imports ``common``, ``catalog`` and ``models``.  ``bundle`` writes a bundle,
``converters`` holds the frameworks' exporters, ``runtime`` runs a bundle on the device runtimes,
``verify`` / ``int8check`` check it, ``latency`` times it side by side, ``cli`` is ``fedcbir export``.
"""
