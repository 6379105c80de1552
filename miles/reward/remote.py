"""A reward served over HTTP (``[rollout] rm_url``): one JSON POST per sample.

Reward models too large or too different to run in the trainer (a learned
RM on its own GPUs, a sandbox that executes code) live behind a URL. The
request body is::

    {"prompt": <as in the data>, "prompt_text": "...", "response": "...",
     "label": <label or null>, "metadata": {...}}

and the response is a JSON number, or an object from which ``reward_key``
picks the number. Transient failures (connection errors, timeouts, HTTP 429
and 5xx) are retried with exponential back-off; other 4xx are the service
saying the request is wrong and fail at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from miles.sample import Sample

logger = logging.getLogger(__name__)


class RemoteRewardError(Exception):
    """The reward service failed for one sample after all retries."""


class RemoteReward:
    """POSTs samples to ``url``; ``await reward(session, sample)`` returns the decoded JSON result."""

    def __init__(self, url: str, *, timeout: float = 60.0, max_retries: int = 3, backoff: float = 0.2) -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_retries = max_retries
        self.backoff = backoff

    @staticmethod
    def payload(sample: Sample) -> dict[str, Any]:
        """The JSON body sent for ``sample`` (the documented wire format)."""
        return {
            "prompt": sample.prompt,
            "prompt_text": sample.prompt_text,
            "response": sample.response_text,
            "label": sample.label,
            "metadata": sample.metadata,
        }

    async def __call__(self, session: aiohttp.ClientSession, sample: Sample) -> Any:
        body = self.payload(sample)
        last: str = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with session.post(self.url, json=body, timeout=self.timeout) as resp:
                    if resp.status == 429 or resp.status >= 500:
                        last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                        continue
                    if resp.status >= 400:
                        raise RemoteRewardError(f"{self.url} answered HTTP {resp.status}: {(await resp.text())[:200]}")
                    return await resp.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
        raise RemoteRewardError(f"{self.url} failed {self.max_retries + 1} times; last error: {last}")
