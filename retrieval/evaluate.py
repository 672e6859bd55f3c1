"""Evaluate any embedding function on the multi-view retrieval protocol.

Test products are decoded once; the gallery is each test product's main image and the
queries are its other photos (ABO's multi-view retrieval benchmark). ``embed`` takes a
normalised float32 NHWC batch and returns embeddings (normalised here).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from retrieval.metrics import retrieval_metrics

EmbedFn = Callable[[np.ndarray], np.ndarray]


class RetrievalEval:
    def __init__(self, table, main_paths: set[str]):
        from catalog.images import normalize

        is_main = np.array([p in main_paths for p in table.paths], dtype=bool)
        if not is_main.any() or is_main.all():
            raise ValueError("retrieval evaluation needs both gallery (main) and query photos")
        self.table = table
        self.is_main = is_main
        self._x = normalize(table.images, table.pre)  # float32, small for a test split

    @classmethod
    def from_split(cls, split, products: Sequence | None = None, pre=None) -> "RetrievalEval":
        from catalog.images import DEFAULT_PREPROCESS

        products = split.test if products is None else list(products)
        table = split.table(products, pre or DEFAULT_PREPROCESS)
        return cls(table, {p.main_image for p in products if p.main_image})

    def embed_all(self, embed: EmbedFn, batch_size: int = 128) -> np.ndarray:
        out = [np.asarray(embed(self._x[i:i + batch_size]), dtype=np.float32)
               for i in range(0, len(self._x), batch_size)]
        return np.concatenate(out, axis=0)

    def metrics_for(self, emb: np.ndarray) -> dict[str, float]:
        t, g, q = self.table, self.is_main, ~self.is_main
        return retrieval_metrics(emb[q], t.labels[q], emb[g], t.labels[g],
                                 query_types=t.types[q], gallery_types=t.types[g])

    def evaluate(self, embed: EmbedFn, batch_size: int = 128) -> dict[str, float]:
        return self.metrics_for(self.embed_all(embed, batch_size))

    def raw_pixels(self) -> dict[str, float]:
        """Baseline: nearest neighbour on the normalised pixels themselves."""
        return self.evaluate(lambda x: x.reshape(len(x), -1))
