"""fedcbir: federated product-image search for the Amazon Berkeley Objects catalog."""

__version__ = "0.1.0"
