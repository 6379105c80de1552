"""Test helper: the pinned SGLang wheel, downloaded at test set-up (``pip download --no-deps``), never installed.

The reading itself lives in :mod:`miles.sglang.wheel` (the flag generator
shares it); this module gives tests one cached :class:`SglangSource` per session.
Bumping ``miles.sglang.flags.SGLANG_PIN`` makes every user re-download
and re-check against the new release.
"""

from __future__ import annotations

from functools import lru_cache

from miles.sglang.wheel import SglangSource, pinned_wheel


@lru_cache(maxsize=1)
def pinned_source() -> SglangSource:
    """The pinned release's sources (downloads the wheel into ``.cache/sglang`` on first use)."""
    return SglangSource(pinned_wheel())
