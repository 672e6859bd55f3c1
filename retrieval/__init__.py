"""On-device retrieval with a bundle: embed photos with its model, a usearch index, a SQLite
metadata store, search, evaluation and ``catalog-search`` (with its upload page).

Layer 4: imports ``common``, ``catalog``, ``models`` (metrics) and ``export`` (runtimes,
manifest).  One way inside: ``vectors`` (usearch layer) and ``embedding`` (photos through a
bundle's model) import no other module here; ``bundle_index`` builds on them, ``resume`` on
that, ``index`` (build/update) and ``search`` on all of those, ``server`` on ``search``,
``cli`` on everything.
"""
