"""What the tests build: seeded refactor-guard networks and inputs, fixture writers (``scripts/make_test_fixtures.py``
runs them)."""
