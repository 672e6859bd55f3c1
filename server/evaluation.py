"""Server-side evaluation of the global model on the held-out test products.

Multi-view retrieval (``models.evaluate.RetrievalEval``): gallery = main photo of each
test product, queries = its other photos. One framework (``eval-framework``, torch by
default) embeds. Under FedBN (``bn-policy = "local"``) the global BN statistics are an
average of clients' local statistics, so they are first recalibrated on the gallery
images, which the server owns (the catalog's main photos), never on the queries.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np


class ServerEvaluator:
    def __init__(self, split, spec, pre, framework: str = "torch", bn_policy: str = "local", threads: int = 1,
                 train_from: int = 0):
        from models.api import TrainConfig, make_trainer
        from models.evaluate import RetrievalEval

        self.evaluator = RetrievalEval.from_split(split, pre=pre)
        self.framework = framework
        self.bn_policy = bn_policy
        self.trainer = make_trainer(framework, spec, TrainConfig(threads=threads, bn_policy=bn_policy,
                                                                             train_from=train_from))

    def _gallery_batches(self, batch_size: int = 32):
        return self.evaluator.gallery_batches(batch_size)  # read from disk batch by batch

    def recalibrated_bn_stats(self, weights: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """BN running statistics ``names`` of ``weights`` re-estimated on the gallery images
        (the catalog's main photos: public data). Under DP they never travel, so a model
        trained from scratch gets them here (``server.federation``)."""
        self.trainer.set_weights(weights)
        self.trainer.recalibrate_bn(self._gallery_batches())
        w = self.trainer.get_weights()
        return {n: w[n] for n in names}

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.trainer.set_weights(weights)
        if self.bn_policy == "local":
            self.trainer.recalibrate_bn(self._gallery_batches())
        m = self.evaluator.evaluate(self.trainer.embed)
        m["eval_seconds"] = time.perf_counter() - t0
        return m
