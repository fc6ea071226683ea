"""``ensemble-bench``: guided sampling over a grid of PDB altloc entries x methods.  manifest (entries, the grid),
entries (carved models, synthetic data), scoring (a job's metrics), report (tables and plots), app (the Hydra sweep,
one job = one ``guidance.app.run``)."""


def main(argv=None) -> int:
    from guidance.bench.app import main as bench_main

    return bench_main(argv)
