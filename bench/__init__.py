"""Throughput and latency benchmark of streamsaga against a bare-Redis baseline.

``python -m bench`` starts an embedded Redis, the controller and the example
workers as separate processes, drives order workflows through the HTTP API in a
closed loop and at a fixed offered rate, and compares the closed-loop throughput
with the same choreography written directly on ``redis.asyncio``
(:mod:`bench.baseline`).  See ``bench/README.md``.
"""
