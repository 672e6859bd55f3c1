"""The data layer: ABO reader, sample-catalog generator, safe images, splits and batches.

Layer 1: imports only ``common`` (and numpy/Pillow).  Submodules are imported on demand
(``from catalog.abo import load_products``); this package imports nothing heavy so that
``fedcbir --help`` stays fast.
"""
