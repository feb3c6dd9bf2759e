"""Side-by-side measurements: ``python -m benchmarks NAME [--quick]``. Never run inside ``make test``."""
