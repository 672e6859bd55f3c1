"""Evaluate any embedding function on the multi-view retrieval protocol.

Test products are decoded once (into an on-disk ``catalog.batches.ImageTable``); the
gallery is each test product's main image and the queries are its other photos (ABO's
multi-view retrieval benchmark). ``embed`` takes a normalised float32 NHWC batch and
returns embeddings (normalised here). Pixels are read and normalised one batch at a time,
so memory holds one batch plus the embeddings, whatever the size of the test split.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from models.metrics import retrieval_metrics

EmbedFn = Callable[[np.ndarray], np.ndarray]
RAW_PIXELS_MAX_IMAGES = 20_000  # 20k x 96 x 96 x 3 float32 = 2.2 GB of "embeddings"


class RetrievalEval:
    def __init__(self, table, main_paths: set[str]):
        is_main = np.array([p in main_paths for p in table.paths], dtype=bool)
        if not is_main.any() or is_main.all():
            raise ValueError("retrieval evaluation needs both gallery (main) and query photos")
        self.table = table
        self.is_main = is_main

    def batches(self, batch_size: int = 128, rows: np.ndarray | None = None):
        """Normalised float32 batches of the table (or of ``rows``), in order, read from disk."""
        from catalog.images import normalize

        t = self.table
        if rows is None:
            for i in range(0, len(t), batch_size):
                yield normalize(t.images[i:i + batch_size], t.pre)
        else:
            rows = np.asarray(rows)
            for i in range(0, len(rows), batch_size):
                yield normalize(t.images[rows[i:i + batch_size]], t.pre)

    def gallery_batches(self, batch_size: int = 32):
        """The gallery (main) photos, normalised, one batch at a time (e.g. BN recalibration)."""
        return self.batches(batch_size, np.flatnonzero(self.is_main))

    @classmethod
    def from_split(cls, split, products: Sequence | None = None, pre=None) -> "RetrievalEval":
        from catalog.images import DEFAULT_PREPROCESS

        products = split.test if products is None else list(products)
        table = split.table(products, pre or DEFAULT_PREPROCESS)
        return cls(table, {p.main_image for p in products if p.main_image})

    def embed_all(self, embed: EmbedFn, batch_size: int = 128) -> np.ndarray:
        out = [np.asarray(embed(x), dtype=np.float32) for x in self.batches(batch_size)]
        return np.concatenate(out, axis=0)

    def metrics_for(self, emb: np.ndarray) -> dict[str, float]:
        t, g, q = self.table, self.is_main, ~self.is_main
        return retrieval_metrics(emb[q], t.labels[q], emb[g], t.labels[g],
                                 query_types=t.types[q], gallery_types=t.types[g])

    def evaluate(self, embed: EmbedFn, batch_size: int = 128) -> dict[str, float]:
        return self.metrics_for(self.embed_all(embed, batch_size))

    def raw_pixels(self) -> dict[str, float] | None:
        """Baseline: nearest neighbour on the normalised pixels themselves (None above
        :data:`RAW_PIXELS_MAX_IMAGES` images: the "embeddings" are whole images)."""
        if len(self.table) > RAW_PIXELS_MAX_IMAGES:
            return None
        return self.evaluate(lambda x: x.reshape(len(x), -1))
