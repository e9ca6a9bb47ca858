"""adasr test suite."""
