"""The static decode buffers: bucket shapes, a batch loaded in place, live rows compacted to the front."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from miles.engine.decode_workspace import FINE_WINDOWS, MIN_WINDOW, WINDOW_STEP, Workspace, bucket
from miles.engine.sampling import BatchSampling, SamplingParams


def _model(head_dim: int) -> SimpleNamespace:
    def rotary_emb(x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1).expand(*positions.shape, head_dim)
        return angles.cos(), angles.sin()

    return SimpleNamespace(lm_head=SimpleNamespace(weight=torch.zeros(1)), model=SimpleNamespace(rotary_emb=rotary_emb))


def _workspace(rows: int = 4, length: int = MIN_WINDOW) -> Workspace:
    return Workspace.allocate(
        _model(8), torch.device("cpu"), rows, length, n_kv=2, head_dim=8, n_layers=2, vocab=11, raw=False
    )


def _sampling(n: int, stop: tuple[int, ...] = ()) -> BatchSampling:
    params = [SamplingParams(max_new_tokens=4, temperature=0.5 + i, stop_token_ids=stop) for i in range(n)]
    return BatchSampling.build(params, list(range(n)), [4] * n, set(), 11, 4)


def test_buckets_and_windows() -> None:
    assert [bucket(n) for n in (1, 2, 3, 5, 64)] == [1, 2, 4, 8, 64]
    assert bucket(3, MIN_WINDOW) == MIN_WINDOW
    ws = _workspace(length=4096)
    assert ws.window(1) == WINDOW_STEP and ws.window(WINDOW_STEP + 1) == 2 * WINDOW_STEP
    assert ws.window(FINE_WINDOWS + 1) == 2 * FINE_WINDOWS  # powers of two past the fine windows
    assert ws.window(10_000) == 4096  # never past the buffers
    assert ws.k[0].shape == (4, 2, 4096, 8) and len(ws.v) == 2
    assert torch.equal(ws.sin[:, :4], -ws.sin[:, 4:])  # rotate_half's sign folded into the table


def test_a_batch_is_loaded_in_place_and_idle_rows_are_neutral() -> None:
    ws = _workspace()
    assert not ws.fits_sampling(_sampling(3))
    ws.load_sampling(_sampling(3), 3)
    assert ws.sampling is not None
    temperature = ws.sampling.temperature
    assert temperature.tolist() == [0.5, 1.5, 2.5, 1.0]  # the padding row samples nothing of note
    assert ws.fits_sampling(_sampling(2))
    ws.load_sampling(_sampling(2), 2)
    assert ws.sampling.temperature is temperature  # same storage: captured graphs keep reading it
    assert temperature.tolist() == [0.5, 1.5, 1.0, 1.0]
    assert ws.sampling_rows(2).temperature.data_ptr() == temperature.data_ptr()


def test_keep_moves_live_rows_to_the_front() -> None:
    ws = _workspace()
    ws.load_sampling(_sampling(4), 4)
    for t in (ws.tok, ws.pos):
        t.copy_(torch.arange(4) * 10)
    ws.k[1][:, 0, 0, 0] = torch.arange(4.0)
    ws.tokens[:, 0] = torch.arange(4)
    ws.keep(4, [3, 1])
    assert ws.tok[:2].tolist() == [30, 10] and ws.pos[:2].tolist() == [30, 10]
    assert ws.k[1][:2, 0, 0, 0].tolist() == [3.0, 1.0]
    assert ws.sampling is not None and ws.sampling.temperature[:2].tolist() == [3.5, 1.5]
    assert ws.read(2, 0, 1)[0] == [[3], [1]]
