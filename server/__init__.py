"""The Flower ServerApp: strategies, update validation, evaluation, checkpoints."""
