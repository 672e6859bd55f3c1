"""The Flower ClientApp and the ``edge-client`` command for emulated or real devices."""
