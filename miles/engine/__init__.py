"""The embedded engine: batched generation with a KV cache, and the HTTP server that speaks SGLang's protocol.

It is the engine where SGLang is absent (a laptop, CPU CI, a small GPU job), so
the driver, the weight sync and the tests run the same code path against it as
against SGLang.
"""
