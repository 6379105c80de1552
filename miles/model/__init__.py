"""Model directories: tiny built-in models written as HF directories (``builtin``)."""
