"""One experiment's view of a catalog: products, the train/test split and type ids.

Centralized training, the federation server and every client build this the same way
from (root, seed, test fraction), so they agree on which products are held out and on
the product-type ids, without passing product lists around.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from catalog.abo import AboCatalog, Product
from catalog.images import DEFAULT_PREPROCESS, Preprocess
from catalog.splits import partition, split_products
from common.errors import FedcbirError
from common.io import cache_dir


@dataclass
class CatalogSplit:
    root: Path
    products: list[Product]
    train: list[Product]
    test: list[Product]
    type_names: list[str]  # catalog-wide, sorted: type id -> name
    seed: int
    test_fraction: float

    @classmethod
    def load(cls, root: str | Path, seed: int = 0, test_fraction: float = 0.2) -> "CatalogSplit":
        root = Path(root)
        products = list(AboCatalog(root).products())
        if len(products) < 4:
            raise FedcbirError(f"{root}: only {len(products)} usable products; need at least 4")
        split = split_products(products, test_fraction=test_fraction, seed=seed)
        type_names = sorted({p.product_type for p in products})
        return cls(root, products, list(split.train), list(split.test), type_names, seed, test_fraction)

    def client_products(self, num_clients: int, scheme: str, client: int, seed: int | None = None) -> list[Product]:
        if not 0 <= client < num_clients:
            raise FedcbirError(f"partition id {client} is outside 0..{num_clients - 1}")
        parts = partition(self.train, num_clients, scheme, self.seed if seed is None else seed)
        return parts[client]

    def table(self, products: Sequence[Product], pre: Preprocess = DEFAULT_PREPROCESS, progress: bool = False):
        """Decoded images of ``products`` (cached on disk under the fedcbir cache folder)."""
        from catalog.batches import ImageTable

        return ImageTable.load(self.root, products, pre, progress=progress,
                               cache_dir=cache_dir() / "images", type_names=self.type_names)


# ----------------------------------------------------------------------------- client holdout


def holdout_photo(product: Product, seed: int = 0) -> str | None:
    """The one photo a federated client keeps out of local training, as its local query.

    Rule (deterministic, no state): only products with a main image and at least two other
    photos hold one out (so at least two photos remain for training); the held-out photo is
    ``other_images[h % len(other_images)]`` with ``h`` the first 8 bytes of
    ``blake2b("fedcbir-holdout:{seed}:{item_id}")``. Products with fewer photos hold
    nothing out and serve as gallery distractors in the local evaluation.
    """
    import hashlib

    others = list(product.other_images)
    if not product.main_image or len(others) < 2:
        return None
    digest = hashlib.blake2b(f"fedcbir-holdout:{int(seed)}:{product.item_id}".encode(), digest_size=8).digest()
    return others[int.from_bytes(digest, "big") % len(others)]


def client_holdout(products: Sequence[Product], seed: int = 0) -> tuple[list[Product], list[Product]]:
    """(training products, local evaluation products) of one client.

    Training products lose their held-out photo (:func:`holdout_photo`); evaluation products
    keep only the main image (the gallery) and the held-out photo (the query), so the local
    retrieval task is "find my product from a photo I never trained on"."""
    import dataclasses

    train: list[Product] = []
    evaluation: list[Product] = []
    for p in products:
        held = holdout_photo(p, seed)
        if held is None:
            train.append(p)
            if p.main_image:
                evaluation.append(dataclasses.replace(p, other_images=[]))
            continue
        train.append(dataclasses.replace(p, other_images=[o for o in p.other_images if o != held]))
        evaluation.append(dataclasses.replace(p, other_images=[held]))
    return train, evaluation
