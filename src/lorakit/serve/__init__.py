"""Serving: an OpenAI-compatible HTTP server for one base model and many LoRA adapters.

``lorakit serve --base DIR --adapter NAME=DIR ...`` (see :mod:`lorakit.serve.cli`). Layers, top
to bottom: ``app`` (FastAPI routes, auth, limits, OpenAI shapes) → ``registry`` (adapter names,
folders, LRU residency) → ``engine`` (continuous batching over a mixed-adapter KV-cached batch) →
``generation`` (sampling, stop strings, detokenisation).
"""
