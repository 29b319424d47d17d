"""``python -m bench <benchmark> [options]``: one subcommand per benchmark, each in its own module.

Add a benchmark by writing ``bench/<name>.py`` with a typer-annotated ``main`` and registering it
below. Keep module imports light: benchmarks that spawn children re-import this file in each one.
"""

from __future__ import annotations

import typer

from bench import autoscale, backlog, burst, capacity, comfy, drills, engine, fuzz, idle, overhead, peer, serve

app = typer.Typer(help="Z-Image platform benchmarks (results: bench/README.md).", no_args_is_help=True)
for _module in (engine, serve, overhead, burst, comfy, capacity, peer, autoscale, fuzz, drills, idle, backlog):
    app.command(_module.__name__.rsplit(".", 1)[-1], help=_module.main.__doc__)(_module.main)


if __name__ == "__main__":
    app()
