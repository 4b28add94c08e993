"""Speed, memory and fault measurements (not tests); each runs as ``python -m benchmarks.<name>``
from the repository root and writes its figures to ``benchmarks/results/``."""
