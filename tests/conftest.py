import pytest


@pytest.fixture(scope="session")
def sample_catalog(tmp_path_factory):
    """A small built-in sample catalog (60 products x 5 views, seed 0), generated once per session."""
    from catalog.sample import generate_sample

    root = tmp_path_factory.mktemp("catalog") / "sample"
    generate_sample(root, products=60, views=5, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory):
    """A tiny sample catalog (24 products x 4 views, seed 0) for federations with tiny models,
    generated once per session; tests only read it."""
    from catalog.sample import generate_sample

    root = tmp_path_factory.mktemp("tinycat") / "sample"
    generate_sample(root, products=24, views=4, seed=0, progress=False)
    return root
