"""Helpers the test modules share (no tests here): one module per subject, imported as
`tests.support.<subject>`, so that no test module imports another. Pytest fixtures they
share are in tests/conftest.py; what the benchmarks use too is in devkit/.
"""
