"""Benchmark, profiling and oracle tooling (outside the runtime package; used by scripts/ and tests/)."""
