"""Throughput benchmarks (``python -m benchmarks.unet`` / ``.sampling`` / ``.fid_features``); see README.md.

Benchmarks print tables; nothing here asserts timings. ``tests/test_benchmarks_smoke.py`` runs each one with
``--quick`` so that their code paths stay working.
"""
