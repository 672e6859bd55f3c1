"""``fedcbir study``: does the framework alone change accuracy, speed, memory and cost?

For every framework in ``--frameworks`` and every seed, one federation in which only the
clients' training framework differs: the same catalog, test split and client partitions (all
derived from the seed), the same initial weights (``models.initial.init_weights``: seeded
numpy, loaded into every framework), the same hyper-parameters, device profile(s), strategy and
server-side evaluation (in PyTorch for all, so the measuring instrument is the same). Plus one
mixed federation per seed (clients round-robin over the frameworks) unless ``--no-mixed``.
Optionally (default on) each framework's final global model of the first seed is exported in its
natural route (torch -> ``model.onnx`` + ``model.pte``; tf -> ``model.tflite`` from Keras; jax ->
``model.tflite`` through jax2tf) and its batch-1 latency is measured beside the eager framework
model (``export.latency``: one thread, pinned, interleaved calls).

Output layout::

    DIR/runs/<label>-s<seed>/   one federation's run folder (metrics.jsonl, checkpoints/,
                                summary.json, study-run.json with its wall time)
    DIR/bundles/<framework>/    export bundles (not with --no-export)
    DIR/study.json              every number, the exact command, the settings, the tolerance
    DIR/report.md               tables and the plots below
    DIR/recall_at_1.png         Recall@1 per round per federation type (mean, +-std band)
    DIR/seconds_per_round.png   simulated device seconds and host seconds per round
    DIR/peak_rss.png            peak RSS of one client process
    DIR/latency.png             batch-1 latency, eager vs exported (only when exported)

Re-running with the same ``--out`` reuses every finished federation whose settings match and
resumes an interrupted one from its last checkpoint (bit-identical with the in-process runtime),
so an interrupted study continues where it stopped; a run folder with other settings is an error.

Runtimes: ``simulation`` (default) is Flower's simulation runtime (``server.simulation``: own
SuperLink, Ray, one CPU per client); ``inprocess`` drives the same ServerApp round loop
(``server.federation.Federation``) over ``server.inprocess.InProcessGrid``, which calls the same
ClientApp in this process (each client's work still runs in a fresh child process unless
``--set client-isolation=inline``): no SuperLink or Ray, fixed node ids, quick and bit-exact.

Modules (each imports only modules listed above it, so no two import each other):

    util     the progress line on stdout and a tolerant JSON read
    plan     constants, argument checks, catalog choice, run configs, ``plan()``, partition pre-check
    stats    per-federation numbers from metrics.jsonl, mean ± std over seeds, 95 % CIs, paired t-tests
    repro    the reproducibility tolerance per runtime and the repeat check (``compare_runs``)
    run      run / reuse / resume one federation; checkpoint weight digests
    child    the child-process job runner (a job runs in a fresh Python)
    export   export of the final models and batch-1 latency (two child jobs)
    device   device-protocol accuracy of each federation (a child job)
    report   ``report.md`` and the summary table
    plots    the PNG plots
    cli      ``register``, ``canonical_command``, ``cmd_study`` (orchestrates the others), ``main``

``python -m fedcbir.study ...`` (``__main__``) is ``fedcbir study ...``.  This file imports and
re-exports nothing.
"""
