"""Benchmarks for the agent, run by ``make bench`` (``python -m tests.benchmarks.run``).

Every figure is printed beside a baseline measured in the same run on the same machine, because
absolute numbers on a shared two-core machine say little; ratios travel better.
"""
