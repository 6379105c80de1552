"""The engine fleet: the driver's handle on every engine, for generation and for weight sync.

The driver (trainer rank 0) is the one trainer rank that talks to the engines:
it sends them the prompts through the rollout client (or sglang-router) and
pushes the actor's weights to them through the weight-update group, and it
keeps both working while engines die and come back (see :class:`EngineFleet`).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from miles.errors import UserError
from miles.job import rundir
from miles.job.environment import TaskContext
from miles.job.ports import free_port
from miles.plan.engine_argv import KEY_ENV, request_chunk
from miles.rollout.client import BlockingRolloutClient, RolloutClient
from miles.rollout.custom import CustomGeneration
from miles.sample import Sample
from miles.sglang import protocol as proto
from miles.sglang.launcher import health_ok
from miles.sglang.router import MAX_IN_FLIGHT, PER_ENGINE_IN_FLIGHT, start_driver_router
from miles.spec.tables import RolloutConfig, Spec
from miles.transfer.colocate import TensorSync
from miles.transfer.sync import DEFAULT_GROUP, SyncError, WeightSync

if TYPE_CHECKING:
    from miles.sglang.router import SglangRouter

T = TypeVar("T")

_NEVER_S = 1e9
"""Within one rollout an engine that failed a request is not used again: if it comes back, it was
restarted with the checkpoint's weights and must first rejoin the weight-update group."""


class _Tracked:
    """The actor's weight iterator, remembering whether a sync started consuming it (then it cannot be retried)."""

    def __init__(self, weights: Iterable[tuple[str, Any]]) -> None:
        self._it = iter(weights)
        self.started = False

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for item in self._it:
            self.started = True
            yield item

    def drain(self) -> None:
        """Walk to the end: producing a full tensor may be a collective the other trainer ranks are in."""
        for _ in self._it:
            pass


@dataclass(frozen=True)
class FleetConfig:
    """What the engine fleet reads of the spec, built once on the driver (:meth:`from_spec`)."""

    rollout: RolloutConfig
    """The sampling parameters of single-turn generation (the client turns them into request bodies)."""
    sync_kind: str
    """``[rollout] weight_sync`` resolved (:func:`weight_sync_kind`): ``tensor`` or ``distributed``."""
    sync_backend: str
    sync_device: str
    """The weight-update group's backend and sender device (:func:`sync_transport`)."""
    bucket_bytes: int
    """``[rollout] update_weight_buffer_size``: the size of one flattened bucket of weights."""
    ranks_per_engine: int
    """GPUs of one engine (``rollout_num_gpus_per_engine`` for SGLang, 1 for the embedded engine)."""
    chunk_size: int
    """Samples per batched ``/generate`` request (:func:`miles.plan.engine_argv.request_chunk`)."""

    @classmethod
    def from_spec(cls, spec: Spec, task: TaskContext) -> FleetConfig:
        backend, device = sync_transport(spec, task)
        return cls(
            rollout=spec.rollout,
            sync_kind=weight_sync_kind(spec, task.device),
            sync_backend=backend,
            sync_device=device,
            bucket_bytes=spec.rollout.update_weight_buffer_size,
            ranks_per_engine=spec.sglang.rollout_num_gpus_per_engine if spec.rollout.engine == "sglang" else 1,
            chunk_size=request_chunk(spec, task.device, task.num_engines),
        )


class EngineFleet:
    """The driver's handle on every engine: generation through the client, weights through the sync group.

    Engines can die and come back: the engine rank restarts its server and
    announces it again with a new pid (:func:`miles.sglang.launcher.serve_engine_task`).
    A restarted engine holds the checkpoint's weights, not the actor's, so the
    fleet keeps the *members* (the engines the weight-update group was formed with
    and that got the last weights) apart from what is announced:

    * generation uses the members only, and drops for the rest of the rollout a
      member that fails a request (the client resends its requests elsewhere) or
      was re-announced since the last sync;
    * every sync first compares the announcements with the members; when one
      changed, the group is re-formed (a fresh port and group name: an SGLang
      server cannot join a group name twice) with every engine that answers
      ``/health_generate``, and the weights are pushed to all of them;
    * a sync that fails before it sends any weight (an engine died since the last
      sync: ``/pause_generation`` fails) re-forms the group without the dead
      engine and syncs again; it rejoins at a later sync, once it is back.

    So a restarted engine serves again from the first rollout after the sync that
    gave it the actor's weights, and the run never waits for it.

    With ``[sglang] use_router = true`` the rollouts go through sglang-router
    instead, whose worker list the fleet keeps to the same engines (see
    :mod:`miles.sglang.router`); everything else still goes to each engine.
    """

    def __init__(
        self,
        cfg: FleetConfig,
        task: TaskContext,
        announced: list[rundir.Announcement],
        custom: CustomGeneration | None = None,
        router: SglangRouter | None = None,
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.custom = custom
        """The spec's generate or rollout function, or None for miles' single-turn generation."""
        self.router = router
        """sglang-router in front of the engines (:func:`driver_router`), or None: rollouts go to each engine."""
        self.api_key = os.environ.get(KEY_ENV) or None
        self.known: dict[int, rundir.Announcement] = {a.index: a for a in announced}
        """The newest announcement seen of every engine."""
        self.members: list[rundir.Announcement] = list(announced)
        """The engines in the weight-update group, holding the weights of the last sync."""
        self.groups_formed = 0
        self.client = BlockingRolloutClient(self.urls, api_key=self.api_key)
        """For control calls to every member (release/resume memory)."""
        self.sync_group = self._form_group(task.weight_update_port)

    @property
    def urls(self) -> list[str]:
        return [a.url for a in self.members]

    # ------------------------------------------------------------------ membership

    def _announcements(self) -> dict[int, rundir.Announcement]:
        found = {}
        for i in range(self.task.num_engines):
            a = rundir.read_announcement(Path(self.task.run_dir), i, self.task.launch_id)
            if a is not None:
                found[i] = a
        return found

    def restarted(self) -> list[int]:
        """Engines announced again (new pid or address) since they were last seen: they have the checkpoint's
        weights.
        """
        return sorted(i for i, a in self._announcements().items() if self.known.get(i) != a)

    def _form_group(self, port: int) -> Any:

        self.groups_formed += 1
        if self.cfg.sync_kind == "tensor":  # colocated: handles to each GPU's copy, no group
            return TensorSync(
                self.urls,
                bucket_bytes=self.cfg.bucket_bytes,
                api_key=self.api_key,
                device=local_device(self.task),
                ranks_per_engine=self.cfg.ranks_per_engine,
                engine_indices=[a.index for a in self.members],
                group=trainer_group(),
            )
        name = DEFAULT_GROUP if self.groups_formed == 1 else f"{DEFAULT_GROUP}_{self.groups_formed}"
        group = WeightSync(
            self.urls,
            master_address=self.task.weight_update_addr,
            master_port=port,
            backend=self.cfg.sync_backend,
            bucket_bytes=self.cfg.bucket_bytes,
            group_name=name,
            api_key=self.api_key,
            device=self.cfg.sync_device,
            ranks_per_engine=self.cfg.ranks_per_engine,
        )
        group.connect()
        return group

    def _reform(self, why: str) -> None:
        """Re-form the weight-update group with every engine that is announced and healthy now."""

        # A sync that failed at /pause_generation left the engines that took the pause paused.
        self._post_each(proto.CONTINUE_GENERATION.path, proto.continue_generation_body())
        self.sync_group.close()  # engines still in the old group leave it; a dead one is skipped
        self.client.close()
        deadline = time.monotonic() + engine_deadline_s()
        while True:
            self.known.update(self._announcements())
            live = [a for _, a in sorted(self.known.items()) if health_ok(a.url, self.api_key, timeout=30)]
            if live or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if not live:
            raise RuntimeError(
                f"no engine answers /health_generate after {engine_deadline_s():.0f} s ({why}); "
                f"see the engines' logs in {Path(self.task.run_dir) / rundir.LOGS}"
            )
        self.members = live
        self.client = BlockingRolloutClient(self.urls, api_key=self.api_key)
        # A fresh port: the old group's listener may still hold the previous one.
        self.sync_group = self._form_group(free_port(0))
        left_out = sorted(set(self.known) - {a.index for a in live})
        print(
            f"miles: weight-update group re-formed ({why}): engines {[a.index for a in live]}"
            + (f"; engines {left_out} are down and rejoin once they are back" if left_out else ""),
            flush=True,
        )

    def _post_each(self, path: str, body: dict[str, Any]) -> None:
        """POST ``body`` to every member, one at a time; an engine that is down is skipped (best effort)."""
        for url in self.urls:
            req = urllib.request.Request(
                url + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
            )
            if self.api_key:
                req.add_header("Authorization", f"Bearer {self.api_key}")
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    r.read()
            except (urllib.error.URLError, OSError):
                pass

    # ------------------------------------------------------------------ the loop's calls

    def generate(
        self, samples: list[Sample], rollout_id: int, weight_version: int, evaluation: bool = False, **overrides: Any
    ) -> None:
        """Fill every sample's response fields; each sample's seed is a pure function of ``rollout_id`` and its
        position. ``evaluation``: an eval set, whose ``overrides`` replace sampling params (temperature, top-p,
        top-k, length); a custom generate or rollout function is told which it serves."""

        urls = self._current_urls()
        if self.router is not None:  # it routes to these engines only; one announced again leaves it at once
            self._generate_routed(samples, rollout_id, urls, weight_version, evaluation, overrides)
            return
        client = BlockingRolloutClient(
            urls, api_key=self.api_key, dead_cooldown_s=_NEVER_S, chunk_size=self.cfg.chunk_size
        )
        try:
            self._generate_with(client, samples, rollout_id, weight_version, evaluation, overrides)
        finally:
            client.close()

    def _generate_with(
        self,
        client: BlockingRolloutClient,
        samples: list[Sample],
        rollout_id: int,
        weight_version: int,
        evaluation: bool,
        overrides: dict[str, Any],
    ) -> None:
        """Single-turn generation, or the spec's generate/rollout function; ``samples`` are filled or replaced."""
        if self.custom is None:
            client.generate(samples, self.cfg.rollout, rollout_id, **overrides)
        else:
            custom = self.custom
            samples[:] = client.run(
                lambda c: custom.run(c, samples, rollout_id, weight_version, evaluation=evaluation, overrides=overrides)
            )

    def fill(self, work: Callable[[RolloutClient], Awaitable[T]]) -> T:
        """Run ``work`` (a rollout that decides as it goes what to send and abort, :mod:`miles.rollout.oversample`)
        with a client over the engines that hold the actor's weights."""

        urls = self._current_urls()
        if self.router is None:
            client = BlockingRolloutClient(
                urls, api_key=self.api_key, dead_cooldown_s=_NEVER_S, chunk_size=self.cfg.chunk_size
            )
            try:
                return client.run(work)
            finally:
                client.close()
        # Through sglang-router (one request per sample, as in _generate_routed); aborts go to each engine.
        router = self.router
        routed = router.route_to(urls)
        client = BlockingRolloutClient(
            [router.url],
            api_key=router.api_key,
            batched=False,
            max_concurrency=min(MAX_IN_FLIGHT, PER_ENGINE_IN_FLIGHT * len(routed)),
            abort_urls=routed,
        )
        stale = lambda: [self.known[i].url for i in self.restarted() if i in self.known]  # noqa: E731
        try:
            with router.guard(routed, stale):
                return client.run(work)
        finally:
            client.close()

    def _current_urls(self) -> list[str]:
        changed = set(self.restarted())
        urls = [a.url for a in self.members if a.index not in changed]
        if not urls:
            raise RuntimeError(
                f"every engine restarted since the last weight sync (engines {sorted(changed)}); "
                "none holds the actor's weights"
            )
        return urls

    def _generate_routed(
        self,
        samples: list[Sample],
        rollout_id: int,
        urls: list[str],
        weight_version: int,
        evaluation: bool,
        overrides: dict[str, Any],
    ) -> None:
        """One rollout through sglang-router to the engines of ``urls``: one request per sample, the router's
        worker list watched while it runs (:meth:`miles.sglang.router.SglangRouter.guard`)."""

        router = self.router
        assert router is not None
        routed = router.route_to(urls)
        # One sample per request: keep as many in flight as batched chunks would (within a file-descriptor budget).
        client = BlockingRolloutClient(
            [router.url],
            api_key=router.api_key,
            batched=False,
            max_concurrency=min(MAX_IN_FLIGHT, PER_ENGINE_IN_FLIGHT * len(routed)),
        )
        stale = lambda: [self.known[i].url for i in self.restarted() if i in self.known]  # noqa: E731
        try:
            with router.guard(routed, stale):
                self._generate_with(client, samples, rollout_id, weight_version, evaluation, overrides)
        finally:
            client.close()

    def release_memory(self) -> None:
        """Colocated GPUs: engines free their weights and KV cache while the actor trains."""

        self.client.call_all(proto.RELEASE_MEMORY_OCCUPATION.path, proto.release_memory_occupation_body())

    def resume_memory(self) -> None:

        self.client.call_all(proto.RESUME_MEMORY_OCCUPATION.path, proto.resume_memory_occupation_body())

    def sync(self, weights: Iterable[tuple[str, Any]], version: int) -> None:
        """Push the actor's weights to every member, first taking in engines that came back (see the class)."""

        changed = self.restarted()
        if changed:
            self._reform(f"engines {changed} restarted")
        named = _Tracked(weights)
        try:
            self.sync_group.sync(named, weight_version=version)
        except SyncError as e:
            if named.started:  # some engines hold part of the new weights: no way to tell which
                named.drain()
                raise
            self._reform(f"weight sync failed before sending: {e}")
            self.sync_group.sync(named, weight_version=version)

    def close(self) -> None:
        self.sync_group.close()
        self.client.close()
        if self.router is not None:
            self.router.close()


def driver_router(spec: Spec, task: TaskContext) -> SglangRouter | None:
    """sglang-router in front of the engines with ``[sglang] use_router``, else None.

    Started before anything else of the fleet: a router that is not installed is the user's to fix (UserError).
    """
    if not spec.sglang.use_router:
        return None
    return start_driver_router(spec, task, os.environ.get(KEY_ENV) or None)


def sync_transport(spec: Spec, task: TaskContext) -> tuple[str, str]:
    """Backend and sender device of the weight-update group: NCCL on GPUs, except where a GPU would host two ranks.

    NCCL refuses two ranks of one communicator on the same GPU ("Duplicate GPU
    detected", since NCCL 2.5). Colocated on GPUs, trainer rank 0 (the sender)
    shares its GPU with engine 0, so there the group runs over gloo: the sender
    flattens each bucket into host memory and the engines receive into their
    GPU tensors through gloo's CUDA path. That is the colocated path only with
    ``[rollout] weight_sync = "distributed"``: by default colocated GPUs use SGLang's
    own colocated transport, CUDA-IPC handles through ``/update_weights_from_tensor``
    (:func:`weight_sync_kind`). Split mode (engines on GPUs of their own) keeps NCCL.
    """
    if task.device != "cuda":
        return "gloo", "cpu"
    if spec.cluster.mode == "colocate":
        return "gloo", "cpu"
    return "nccl", f"cuda:{task.local_rank}"


def weight_sync_kind(spec: Spec, device: str) -> str:
    """``[rollout] weight_sync`` resolved: ``tensor`` (colocated, :mod:`miles.transfer.colocate`) or ``distributed``.

    ``auto`` takes the tensor path when colocated on GPUs: each trainer rank shares
    its GPU with an engine rank, so a CUDA-IPC handle replaces a broadcast (and
    sidesteps NCCL's refusal of two ranks on one GPU, see :func:`sync_transport`).
    """
    choice = spec.rollout.weight_sync
    if choice == "auto":
        return "tensor" if spec.cluster.mode == "colocate" and device == "cuda" else "distributed"
    if choice == "tensor" and spec.cluster.mode != "colocate":
        raise UserError(
            f'{spec.source or "the run spec"}: [rollout] weight_sync = "tensor" needs '
            f'[cluster] mode = "colocate" (engines on the trainers\' GPUs), but mode is '
            f'"{spec.cluster.mode}". Fix: set weight_sync = "auto" or "distributed".'
        )
    return choice


def trainer_group() -> Any:
    """The trainers' process group when there are several trainer ranks (the tensor sync's peers), else None."""
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


def local_device(task: TaskContext) -> str:
    return f"cuda:{task.local_rank}" if task.device == "cuda" else "cpu"


def engine_deadline_s() -> float:
    """How long the driver waits for engines (``MILES_ENGINE_DEADLINE``, as ``miles.launch.task``)."""
    return float(os.environ.get("MILES_ENGINE_DEADLINE", "900"))
