"""The Flower ClientApp and the ``edge-client`` command for emulated or real devices.

Layer 4: imports ``common``, ``catalog``, ``device_profiles``, ``models`` and ``server``'s
contract (``server.runconfig``, the client-side DP mod of ``server.privacy``).
"""
