"""diffrecon's reproducible benchmarks: quality, exactness, speed and uncertainty tables.

Run from the repository root: ``python -m benchmarks.<name> [--quick] [--out DIR]`` runs one
script (each prints a markdown report), ``python -m benchmarks [NAMES] [--quick] --out DIR``
(what ``diffrecon bench`` calls) runs them all and collects their reports in
``DIR/RESULTS.md``. ``common`` is the one shared module; curated results are in
``RESULTS.md`` beside this file.
"""
