"""The Flower ServerApp: the run config, strategies, update validation, privacy, evaluation, the
round loop with checkpoints, and the runtimes that host it (simulation, deployment, in process).

Layer 3 (beside ``export``): imports ``common``, ``catalog`` and ``models``.  ``runconfig`` is the
contract with the clients (they import it); the server never imports ``edge_client``: the
ClientApp reaches the runtimes by name (``edge_client.app:app``) or as an argument.
"""
