"""Adapters from embedrl's models to other libraries: :mod:`embedrl.integrations.sentence_transformers`.

Each submodule imports its own library (an optional extra, e.g. ``embedrl[st]``) and is imported only when used:
this package imports nothing.
"""
