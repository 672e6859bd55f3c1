import pytest


@pytest.fixture(scope="session")
def sample_catalog(tmp_path_factory):
    """A small built-in sample catalog (60 products x 5 views, seed 0), generated once per session."""
    from catalog.sample import generate_sample

    root = tmp_path_factory.mktemp("catalog") / "sample"
    generate_sample(root, products=60, views=5, seed=0, progress=False)
    return root
