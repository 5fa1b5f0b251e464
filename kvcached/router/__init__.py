"""kvcached-router: one OpenAI endpoint for many engines, with sleep when idle, scale to zero and Prometheus metrics.

Modules, one concept each: config (the file and its checks), engine (an owned process group), engine_api (the
engine's health and sleep calls), queueing (the bounded wait while a model starts or wakes), memory (making room
before a start or wake), lifecycle (one model's state machine), proxy (the OpenAI routes), metrics (/metrics), app
(wiring, signals, the `kvcached-router` command). Needs aiohttp, pyyaml and prometheus-client (`kvcached[router]`).
"""
