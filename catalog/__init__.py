"""The data layer: ABO reader, sample-catalog generator, safe images, splits and batches.

Submodules are imported on demand (``from catalog.abo import load_products``); this
package imports nothing heavy so that ``fedcbir --help`` stays fast.
"""
