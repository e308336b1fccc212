"""Serving and search: the FAISS index (:mod:`~embedrl.serve.index`), the OpenAI-compatible server
(:mod:`~embedrl.serve.server`), its chat models (:mod:`~embedrl.models.chat`) and micro-batcher
(:mod:`~embedrl.serve.batching`). ``docs/serve.md`` describes the commands, endpoints and files.

Nothing heavy is imported here; import the submodules (the server needs the ``serve`` extra: fastapi, uvicorn).
"""
