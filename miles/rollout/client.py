"""The rollout client: SGLang /generate over several engines, with balancing, timeouts and retries.

The loop hands a list of :class:`~miles.sample.Sample` to :meth:`RolloutClient.generate`
and gets their response fields filled. Requests go to SGLang servers or embedded
engines alike (same protocol). What the client guarantees:

* bounded concurrency (``max_concurrency`` requests in flight over all engines);
* least-outstanding-requests balancing when there is no router in front;
* a per-request timeout; a request that fails by connection error, timeout or
  a 5xx answer is retried with exponential backoff on another engine, and the
  failed engine is avoided for ``dead_cooldown_s`` (a restarted engine is used
  again after that); a 4xx answer is the request's own fault and is raised;
* samples whose generation was aborted (``finish_reason`` abort, e.g. by a pause
  around a weight sync) are sent again, up to the retry budget;
* exact resume: each sample's ``sampling_seed`` is a pure function of
  (``rollout_seed``, ``rollout_id``, the sample's position in the list), and the
  samples are sent in fixed consecutive chunks of ``chunk_size``, each one
  batched ``/generate`` request (the embedded engine generates a batched request
  as exactly one batch). The same rollout therefore produces the same tokens
  again after a restart.

With ``batched=False`` every sample is its own single-prompt ``/generate``
request: what sglang-router accepts (it parses ``sampling_params`` as one
object, so a batch carrying each sample's own seed is refused with 422; see
:mod:`miles.sglang.router`). Seeds are the same; which samples an
engine batches together is then up to the engines' scheduler.

Sessions: requests that share a prefix name it, and all of them go to one
engine, whose prefix cache then holds it: a multi-turn sample's turns
(:func:`conversation_key`) and, one request per sample, a prompt's samples
(:func:`group_key`). The client keeps a session on the engine that answered
its first request; behind a router it sends the session as the router's
routing key (:data:`miles.sglang.router.ROUTING_KEY_HEADER`), which its
``manual`` policy keeps on one engine.

Use it from synchronous code through :class:`BlockingRolloutClient`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from miles.errors import UserError
from miles.sample import Sample
from miles.sglang import protocol as proto
from miles.sglang.router import ROUTING_KEY_HEADER
from miles.spec.tables import RolloutConfig

T = TypeVar("T")


@dataclass(frozen=True)
class TurnOutput:
    """One ``/generate`` answer for one token sequence: what a generate function builds a conversation from."""

    output_ids: list[int]
    logprobs: list[float]
    """The engine's log-probability of each of ``output_ids`` (0.0 where it gave none)."""
    text: str
    finish_reason: str
    """``stop``, ``length`` or ``abort`` (aborted again after every retry)."""
    weight_version: int | None
    cached_tokens: int
    """Prompt tokens the engine found in its prefix cache (SGLang's ``meta_info.cached_tokens``; 0 when absent)."""
    engine: str
    """URL the request went to (the router's, behind a router)."""


class RolloutError(RuntimeError):
    """Generation failed for good: every retry failed, or an engine rejected a request as invalid."""


def sample_seed(rollout_seed: int, rollout_id: int, index: int) -> int:
    """The ``sampling_seed`` of sample ``index`` of rollout ``rollout_id`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"miles:{rollout_seed}:{rollout_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def conversation_key(rollout_id: int, index: int, evaluation: bool = False) -> str:
    """The session of sample ``index`` of rollout ``rollout_id`` when it is a conversation (several turns): the
    same for all its turns, different for every sample of the run (an eval set's apart from the rollout's)."""
    return f"r{rollout_id}{'-eval' if evaluation else ''}-s{index}"


def group_key(rollout_id: int, group_index: int) -> str:
    """The session of a prompt's samples sent one per request: they share the prompt, so one engine prefills it."""
    return f"r{rollout_id}-g{group_index}"


def turn_seed(seed: int, turn: int) -> int:
    """The ``sampling_seed`` of turn ``turn`` of a conversation whose first turn has ``seed``."""
    return seed if turn == 0 else sample_seed(seed, 0, turn)


def sampling_params(cfg: RolloutConfig, seed: int | None = None, **overrides: Any) -> dict[str, Any]:
    """SGLang ``sampling_params`` for the rollout config (``overrides`` win, e.g. eval's temperature).

    ``no_stop_trim`` keeps a matched stop string in ``text`` so the text the reward
    reads is the decoding of the tokens the trainer trains on.
    """
    kw: dict[str, Any] = {
        "temperature": cfg.rollout_temperature,
        "top_p": cfg.rollout_top_p,
        "top_k": cfg.rollout_top_k,
        "max_new_tokens": cfg.rollout_max_response_len,
        "stop": cfg.rollout_stop,
        "stop_token_ids": cfg.rollout_stop_token_ids,
        "sampling_seed": seed,
        "no_stop_trim": True,
    }
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return proto.sampling_params(**kw)


@dataclass
class _Engine:
    url: str
    outstanding: int = 0
    dead_until: float = 0.0
    failures: int = 0


class _Retriable(Exception):
    """A failure that another engine (or a later try) may not have."""


class RolloutClient:
    """Async client over engine URLs (``http://host:port``); use ``async with`` or call :meth:`close`."""

    def __init__(
        self,
        urls: Sequence[str],
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout_s: float = 600.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        chunk_size: int = 32,
        dead_cooldown_s: float = 5.0,
        batched: bool = True,
        abort_urls: Sequence[str] | None = None,
    ) -> None:
        if not urls:
            raise UserError("no engine URLs to send rollouts to")
        self.engines = [_Engine(u.rstrip("/")) for u in urls]
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.chunk_size = max(1, chunk_size)
        self.batched = batched
        """False: one single-prompt request per sample (a router in front), else batched chunks."""
        self.abort_urls = [u.rstrip("/") for u in abort_urls] if abort_urls else [e.url for e in self.engines]
        """Where :meth:`abort` goes: the engines themselves, also when ``urls`` is a router in front of them."""
        self.dead_cooldown_s = dead_cooldown_s
        self.max_concurrency = max_concurrency
        self._sem: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None
        self.retries = 0
        """Requests re-sent so far (a metric for the loop's log)."""
        self.sessions: dict[str, str] = {}
        """Session (a conversation) -> the engine URL its turns go to."""

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ engines

    def _pick(self, avoid: set[str]) -> _Engine:
        now = time.monotonic()
        alive = [e for e in self.engines if e.dead_until <= now and e.url not in avoid]
        if not alive:
            alive = [e for e in self.engines if e.dead_until <= now] or sorted(
                self.engines, key=lambda e: e.dead_until
            )[:1]
        return min(alive, key=lambda e: (e.outstanding, e.failures))

    async def _request(
        self, engine: _Engine, method: str, path: str, body: Any, timeout: float, key: str | None = None
    ) -> Any:
        session = self._http()
        headers = {ROUTING_KEY_HEADER: key} if key else None
        try:
            async with session.request(
                method, engine.url + path, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                text = await resp.text()
                if resp.status >= 500 or resp.status in (408, 429):
                    raise _Retriable(f"{engine.url}{path} answered {resp.status}: {text[:300]}")
                if resp.status >= 400:
                    raise RolloutError(f"{engine.url}{path} rejected the request ({resp.status}): {text[:500]}")
                return await resp.json(content_type=None) if text else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise _Retriable(f"{engine.url}{path} failed: {type(e).__name__}: {e}") from e

    async def post(self, path: str, body: Any, session: str | None = None) -> Any:
        """POST to the least loaded engine, retrying elsewhere with backoff on engine failure.

        ``session``: requests of one session go to the engine that answered its first one while that engine is up
        (its prefix cache holds the conversation so far); behind a router the session is the request's routing key,
        and the router keeps it on one engine. See :meth:`generate_turn`.
        """
        result, _ = await self._post(path, body, session)
        return result

    async def _post(self, path: str, body: Any, session: str | None) -> tuple[Any, str]:
        self._http()
        assert self._sem is not None
        errors: list[str] = []
        avoid: set[str] = set()
        for attempt in range(self.max_retries + 1):
            engine = self._sticky(session, avoid) or self._pick(avoid)
            async with self._sem:
                engine.outstanding += 1
                try:
                    result = await self._request(engine, "POST", path, body, self.timeout_s, key=session)
                    engine.failures = 0
                    if session is not None:
                        self.sessions[session] = engine.url
                    return result, engine.url
                except _Retriable as e:
                    errors.append(str(e))
                    engine.failures += 1
                    engine.dead_until = time.monotonic() + self.dead_cooldown_s
                    avoid.add(engine.url)
                finally:
                    engine.outstanding -= 1
            if attempt < self.max_retries:
                self.retries += 1
                await asyncio.sleep(self.backoff_s * (2**attempt) * (0.5 + random.random()))
        raise RolloutError(f"{path} failed after {self.max_retries + 1} tries: " + " | ".join(errors[-3:]))

    def end_sessions(self, sessions: Iterable[str]) -> None:
        """Forget the engines of finished conversations: a client that lives for many rollouts holds only the
        sessions still going (a resumed or repeated conversation picks its engine afresh)."""
        for session in sessions:
            self.sessions.pop(session, None)

    def _sticky(self, session: str | None, avoid: set[str]) -> _Engine | None:
        url = self.sessions.get(session) if session is not None else None
        now = time.monotonic()
        return next((e for e in self.engines if e.url == url and e.dead_until <= now and url not in avoid), None)

    async def call_all(self, path: str, body: Any = None, method: str = "POST") -> list[Any]:
        """Send one control request to every engine (pause, continue, flush ...); errors are raised."""
        return list(
            await asyncio.gather(*(self._request(e, method, path, body or {}, self.timeout_s) for e in self.engines))
        )

    async def wait_healthy(self, deadline_s: float = 600.0, poll_s: float = 1.0) -> None:
        """Wait until every engine answers /health_generate with 200, or raise naming those that did not."""
        end = time.monotonic() + deadline_s
        pending = {e.url: e for e in self.engines}
        last: dict[str, str] = {}
        while pending:
            for url, engine in list(pending.items()):
                try:
                    await self._request(engine, "GET", proto.HEALTH_GENERATE.path, None, min(30.0, deadline_s))
                    del pending[url]
                except (_Retriable, RolloutError) as e:
                    last[url] = str(e)
            if not pending:
                return
            if time.monotonic() >= end:
                detail = "; ".join(f"{u}: {last.get(u, 'no answer')}" for u in pending)
                raise RolloutError(f"{len(pending)} engine(s) not healthy after {deadline_s:.0f} s: {detail}")
            await asyncio.sleep(poll_s)

    # ------------------------------------------------------------------ rollouts

    async def generate(
        self,
        samples: Sequence[Sample],
        cfg: RolloutConfig,
        rollout_id: int,
        first_index: int = 0,
        rid_prefix: str | None = None,
        stop: asyncio.Event | None = None,
        continue_partial: bool = False,
        **overrides: Any,
    ) -> None:
        """Fill ``response_*``, ``finish_reason`` and ``weight_version`` of every sample, in place.

        ``first_index``: the position of ``samples[0]`` in its rollout (seeds follow positions, so a
        rollout sent in several calls samples as one sent at once). ``rid_prefix``: each sample's
        request id is ``{rid_prefix}-{position}``, for :meth:`abort`. Once ``stop`` is set, aborted
        samples keep ``finish_reason`` abort instead of being sent again (the caller aborted them).
        ``continue_partial`` (``[rollout] partial_rollout``): a sample aborted in an earlier rollout
        (``finish_reason`` abort) is continued, token in, token out: the engine gets the prompt and the
        response so far and generates at most what is left of ``rollout_max_response_len``; the new
        tokens are appended with a version span of their own. A sample that had finished is left as it is.
        ``overrides`` replace sampling params (``temperature=``, ``max_new_tokens=`` ... for eval).
        """
        positions = range(first_index, first_index + len(samples))
        seeds = [sample_seed(cfg.rollout_seed, rollout_id, i) for i in positions]
        rids = [f"{rid_prefix}-{i}" for i in positions] if rid_prefix is not None else None
        size = self.chunk_size if self.batched else 1
        prefixes = [_Prefix.of(s) if continue_partial else _Prefix() for s in samples]
        for s, prefix in zip(samples, prefixes, strict=True):
            if prefix.ids and len(prefix.ids) >= cfg.rollout_max_response_len:
                s.finish_reason = "length"  # stopped at its last token: nothing is left to generate
        todo = [i for i, s in enumerate(samples) if not (continue_partial and s.finish_reason in ("stop", "length"))]
        chunks = [todo[s : s + size] for s in range(0, len(todo), size)]
        await asyncio.gather(
            *(self._generate_chunk(samples, c, seeds, rids, cfg, rollout_id, overrides, stop, prefixes) for c in chunks)
        )

    async def abort(self, rids: Sequence[str]) -> None:
        """Ask every engine to abort the requests ``rids`` (SGLang's ``/abort_request``); an engine down is skipped.

        An aborted request answers at once with what it generated so far and ``finish_reason`` abort.
        """
        sem = asyncio.Semaphore(self.max_concurrency)  # not generation's: its slots wait for these very aborts

        async def one(url: str, rid: str) -> None:
            async with sem:  # thousands of rids over many engines: bounded like generation
                body = proto.abort_request_body(rid=rid)
                await self._request(_Engine(url), "POST", proto.ABORT_REQUEST.path, body, self.timeout_s)

        calls = [one(url, rid) for url in self.abort_urls for rid in rids]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, RolloutError):
                raise result

    async def _generate_chunk(
        self,
        samples: Sequence[Sample],
        index: list[int],
        seeds: list[int],
        rids: list[str] | None,
        cfg: RolloutConfig,
        rollout_id: int,
        overrides: dict[str, Any],
        stop: asyncio.Event | None,
        prefixes: list[_Prefix],
    ) -> None:
        todo = index

        def params(i: int) -> dict[str, Any]:
            if not prefixes[i].ids:
                return sampling_params(cfg, seeds[i], **overrides)
            left = cfg.rollout_max_response_len - len(prefixes[i].ids)
            return sampling_params(cfg, seeds[i], **{**overrides, "max_new_tokens": left})

        for attempt in range(self.max_retries + 1):
            if self.batched:
                body = proto.generate_body(
                    input_ids=[samples[i].prompt_ids + prefixes[i].ids for i in todo],
                    sampling=[params(i) for i in todo],
                    return_logprob=True,
                )
                if rids is not None:
                    body["rid"] = [rids[i] for i in todo]
                session = None
            else:  # one sample: a single-prompt body, answered by one object; its prompt's samples on one engine
                (only,) = todo
                body = proto.generate_body(
                    input_ids=samples[only].prompt_ids + prefixes[only].ids,
                    sampling=params(only),
                    return_logprob=True,
                    rid=None if rids is None else rids[only],
                )
                session = group_key(rollout_id, samples[only].group_index)
            outs = await self.post(proto.GENERATE.path, body, session)
            if not self.batched and isinstance(outs, dict):
                outs = [outs]
            if not isinstance(outs, list) or len(outs) != len(todo):
                raise RolloutError(f"/generate answered {type(outs).__name__} for a batch of {len(todo)}")
            aborted = []
            for i, out in zip(todo, outs, strict=True):
                _fill(samples[i], out)
                prefixes[i].extend(samples[i])
                if samples[i].finish_reason == "abort":
                    aborted.append(i)
            if not aborted or (stop is not None and stop.is_set()):
                return
            todo = aborted
            if attempt < self.max_retries:
                self.retries += 1
                await asyncio.sleep(self.backoff_s * (2**attempt))

    async def generate_turn(
        self, input_ids: list[int], params: dict[str, Any], session: str | None = None
    ) -> TurnOutput:
        """Generate from token ids (token in, token out): the call a generate function makes once per model turn.

        ``params`` are SGLang ``sampling_params`` (:func:`sampling_params`). Without a router the body is a batch of
        one, which the embedded engine generates on its own, so a conversation's tokens do not depend on what
        else is in flight (exact resume); behind a router it is one object (what sglang-router parses). An
        aborted answer (a pause around a weight sync) is sent again, up to the retry budget. ``session`` keeps
        a conversation's turns on one engine (see :meth:`post`).
        """
        for attempt in range(self.max_retries + 1):
            if self.batched:
                body = proto.generate_body(input_ids=[list(input_ids)], sampling=[params], return_logprob=True)
            else:
                body = proto.generate_body(input_ids=list(input_ids), sampling=params, return_logprob=True)
            out, url = await self._post(proto.GENERATE.path, body, session)
            if isinstance(out, list):
                if len(out) != 1:
                    raise RolloutError(f"/generate answered {len(out)} outputs for one prompt")
                out = out[0]
            turn = _turn(out, url)
            if turn.finish_reason != "abort" or attempt == self.max_retries:
                return turn
            self.retries += 1
            await asyncio.sleep(self.backoff_s * (2**attempt))
        raise AssertionError("unreachable")

    async def generate_turns(
        self, requests: Sequence[tuple[list[int], dict[str, Any]]], sessions: Sequence[str | None] | None = None
    ) -> list[TurnOutput]:
        """Several sequences' next turns: fixed consecutive chunks of ``chunk_size``, each one batched request
        (single requests behind a router, each in its ``sessions`` entry, a conversation's key); an aborted answer
        is sent again, up to the retry budget."""
        if not self.batched:
            keys = list(sessions) if sessions is not None else [None] * len(requests)
            if len(keys) != len(requests):
                raise ValueError(f"{len(keys)} sessions for {len(requests)} requests")
            turns = (self.generate_turn(ids, p, session=k) for (ids, p), k in zip(requests, keys, strict=True))
            return list(await asyncio.gather(*turns))
        size = self.chunk_size
        chunks = [list(range(s, min(s + size, len(requests)))) for s in range(0, len(requests), size)]
        results: list[TurnOutput | None] = [None] * len(requests)

        async def chunk(index: list[int]) -> None:
            todo = index
            for attempt in range(self.max_retries + 1):
                body = proto.generate_body(
                    input_ids=[list(requests[i][0]) for i in todo],
                    sampling=[requests[i][1] for i in todo],
                    return_logprob=True,
                )
                outs, url = await self._post(proto.GENERATE.path, body, None)
                if not isinstance(outs, list) or len(outs) != len(todo):
                    raise RolloutError(f"/generate answered {type(outs).__name__} for a batch of {len(todo)}")
                for i, out in zip(todo, outs, strict=True):
                    results[i] = _turn(out, url)
                todo = [i for i in todo if results[i].finish_reason == "abort"]  # type: ignore[union-attr]
                if not todo or attempt == self.max_retries:
                    return
                self.retries += 1
                await asyncio.sleep(self.backoff_s * (2**attempt))

        await asyncio.gather(*(chunk(c) for c in chunks))
        return [r for r in results if r is not None]


def _turn(out: dict[str, Any], url: str) -> TurnOutput:
    meta = out.get("meta_info", {})
    ids = [int(t) for t in out.get("output_ids", [])]
    lps = [float(x[0]) if x[0] is not None else 0.0 for x in meta.get("output_token_logprobs", [])][: len(ids)]
    lps += [0.0] * (len(ids) - len(lps))
    reason = meta.get("finish_reason") or {}
    version = str(meta.get("weight_version", ""))
    return TurnOutput(
        output_ids=ids,
        logprobs=lps,
        text=out.get("text") or "",
        finish_reason=str(reason.get("type", "")) if isinstance(reason, dict) else str(reason),
        weight_version=int(version) if version.isdigit() else None,
        cached_tokens=int(meta.get("cached_tokens") or 0),
        engine=url,
    )


def _fill(sample: Sample, out: dict[str, Any]) -> None:
    meta = out.get("meta_info", {})
    ids = [int(t) for t in out.get("output_ids", [])]
    lps = [float(x[0]) if x[0] is not None else 0.0 for x in meta.get("output_token_logprobs", [])]
    sample.response_ids = ids
    sample.response_logprobs = lps[: len(ids)]
    sample.response_text = out.get("text") or ""
    reason = meta.get("finish_reason") or {}
    sample.finish_reason = str(reason.get("type", "")) if isinstance(reason, dict) else str(reason)
    version = str(meta.get("weight_version", ""))
    if version.isdigit():
        sample.weight_version = int(version)


@dataclass
class _Prefix:
    """What a continued partial sample had generated before this request (empty for a fresh sample)."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    loss_mask: list[int] | None = None
    spans: list[list[int]] = field(default_factory=list)

    @classmethod
    def of(cls, sample: Sample) -> _Prefix:
        """The response so far of a sample aborted earlier (``finish_reason`` abort), else nothing."""
        if sample.finish_reason != "abort" or not sample.response_ids:
            return cls()
        spans = [list(s) for s in sample.version_spans] or [[0, len(sample.response_ids), sample.weight_version]]
        mask = list(sample.loss_mask) if sample.loss_mask is not None else None
        return cls(list(sample.response_ids), list(sample.response_logprobs), sample.response_text, mask, spans)

    def extend(self, sample: Sample) -> None:
        """``sample`` holds this request's answer alone: put the prefix in front and record the new tokens' span."""
        if not self.ids:
            return
        new = len(sample.response_ids)
        sample.response_ids = self.ids + sample.response_ids
        sample.response_logprobs = self.logprobs + sample.response_logprobs
        sample.response_text = self.text + sample.response_text
        if self.loss_mask is not None:
            sample.loss_mask = self.loss_mask + [1] * new
        sample.version_spans = [list(s) for s in self.spans]
        if new:
            sample.version_spans.append([len(self.ids), len(self.ids) + new, sample.weight_version])


class BlockingRolloutClient:
    """:class:`RolloutClient` for synchronous callers (the loop): owns a private event loop."""

    def __init__(self, urls: Sequence[str], **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self.client = RolloutClient(urls, **kw)

    def generate(self, samples: Sequence[Sample], cfg: RolloutConfig, rollout_id: int, **overrides: Any) -> None:
        self._loop.run_until_complete(self.client.generate(samples, cfg, rollout_id, **overrides))

    def run(self, work: Callable[[RolloutClient], Awaitable[T]]) -> T:
        """``await work(client)`` on this client's event loop (a caller's own async rollout logic)."""
        return self._loop.run_until_complete(work(self.client))

    def wait_healthy(self, deadline_s: float = 600.0) -> None:
        self._loop.run_until_complete(self.client.wait_healthy(deadline_s))

    def call_all(self, path: str, body: Any = None, method: str = "POST") -> list[Any]:
        return self._loop.run_until_complete(self.client.call_all(path, body, method))

    def close(self) -> None:
        self._loop.run_until_complete(self.client.close())
        self._loop.close()
