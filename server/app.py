"""The Flower ServerApp of fedcbir: ``flwr run`` loads ``server.app:app``.

Reads the run config (``server.runconfig``), then runs :class:`server.federation.Federation`:
validated strategy, per-round server evaluation, checkpoints, ``metrics.jsonl`` and
``summary.json`` in the run folder (run config ``out``; an absolute path, because the
ServerApp's working directory is whatever the SuperLink was started from).
"""
from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from server.federation import Federation
    from server.runconfig import RunConfig

    cfg = RunConfig.from_flower(context.run_config)
    out = Path(cfg.out) if cfg.out else Path.cwd() / "runs" / f"flwr-{context.run_id}"
    Federation(grid, cfg, out, run_id=context.run_id).run()
