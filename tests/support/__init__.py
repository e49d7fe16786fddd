"""Helpers only the tests use (`from support.poc import ...`: pytest puts tests/ on sys.path, as the rootdir of
its conftest.py). What benchmarks use too is in nvflare_lora/testing/."""
