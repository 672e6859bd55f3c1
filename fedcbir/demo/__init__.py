"""``fedcbir demo``: the main job end to end on the built-in sample catalog.

Modules: ``stages`` (settings and the four working stages), ``report`` (report.md, plots,
results.html), ``cli`` (the whole job, its summary and the command).

Stages (each is cached in ``--out``; a re-run redoes only what is missing or stale):

1. **federation** (``OUT/federation``): three emulated devices, PyTorch on a Raspberry Pi 4,
   TensorFlow on a Pi 5 and JAX on a Jetson Nano (CPU), federated with Flower's
   simulation runtime (``fedcbir simulate``); a finished run with the same settings is
   reused, an interrupted or shorter one is resumed from its newest checkpoint;
2. **export** (``OUT/bundle``): the final global model as TFLite / ONNX / ExecuTorch files
   (+ int8 TFLite) with a manifest and parity checks (``fedcbir export``); reused while the
   manifest names the same checkpoint weights;
3. **index** (into the bundle): every catalog photo embedded with LiteRT on one thread into
   a usearch index + SQLite store (``catalog-search index``); reused while it was built
   with this bundle's model;
4. **search**: Recall@1/5/10 on the test products through the device runtime
   (``catalog-search eval``) and top-5 results for a few query photos;
5. **report**: ``OUT/report.md`` (tables + PNG plots: recall per round, simulated round
   time per device), ``OUT/results.html`` (query photos beside their top-5 products, images
   embedded, opens offline) and ``OUT/demo.json`` (every number above).
"""
