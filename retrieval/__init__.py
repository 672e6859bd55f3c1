"""On-device retrieval: runtimes, usearch index, metadata store, metrics, catalog-search."""
