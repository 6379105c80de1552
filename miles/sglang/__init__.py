"""The SGLang contract: request bodies, launch flags read from the pinned wheel, engine launch and the router.

Everything miles says to an engine goes through :mod:`miles.sglang.protocol`, so
the embedded engine and a real SGLang server are interchangeable behind it.
"""
