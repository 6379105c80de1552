"""The embedded engine's CUDA-graph decode across changing batch shapes, as a GRPO loop drives it.

A loop's batches grow and shrink and carry different stop-token lists, so the
decoder re-buckets its workspace and drops and re-captures graphs; each of
those paths must give the tokens of the same decoder run eagerly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from miles.engine.core import Engine, GenerationRequest
from miles.engine.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)"),
]


def _batches(engine: Engine) -> list[list[GenerationRequest]]:
    def req(text: str, **kw: object) -> GenerationRequest:
        params = SamplingParams(**{"max_new_tokens": 12, "temperature": 0.0, **kw})  # type: ignore[arg-type]
        return GenerationRequest(engine.tokenizer(text).input_ids, params)

    small = [req("12=", stop_token_ids=(5,)), req("7+8=")]
    large = [req(f"{i}{i + 1}=", temperature=1.0, sampling_seed=i) for i in range(9)]
    longer = [req("123456789012=", max_new_tokens=40, stop_token_ids=(3, 4, 5, 6, 7, 8, 9, 10, 11)) for _ in range(3)]
    return [small, large, small, longer, large]


def test_graphs_follow_growing_batches_and_match_eager(tmp_path: Path) -> None:
    from miles.model.builtin import materialize

    model_dir = materialize("tiny-arith", tmp_path / "tiny", seed=0)
    graphs = Engine(model_dir, device="cuda:0", dtype="float32", seed=0, decoder="static", cuda_graphs=True)
    eager = Engine(model_dir, device="cuda:0", dtype="float32", seed=0, decoder="static", cuda_graphs=False)
    for batch in _batches(graphs):
        a = graphs.generate(batch)
        b = eager.generate(batch)
        assert [o.output_ids for o in a] == [o.output_ids for o in b]
    with torch.no_grad():  # a weight change (a sync) between batches
        for p in graphs.model.parameters():
            p.mul_(0.5)
        for p in eager.model.parameters():
            p.mul_(0.5)
    for batch in _batches(graphs)[:2]:
        assert [o.output_ids for o in graphs.generate(batch)] == [o.output_ids for o in eager.generate(batch)]


def test_fused_graphs_match_the_unfused_engine(tmp_path: Path) -> None:
    """Compiled (Triton) elementwise chains and sampling, captured in the graphs, across growing and shrinking
    batches and a weight change: the tokens of the unfused engine, logprobs within float32 rounding."""
    pytest.importorskip("triton")
    from miles.model.builtin import materialize

    model_dir = materialize("tiny-arith", tmp_path / "tiny", seed=0)
    fused = Engine(model_dir, device="cuda:0", dtype="float32", seed=0, decoder="static", fuse=True)
    plain = Engine(model_dir, device="cuda:0", dtype="float32", seed=0, decoder="static", fuse=False)
    assert fused.decoder is not None and fused.decoder.fusion.on
    for step, batch in enumerate(_batches(fused)):
        if step == 3:
            with torch.no_grad():
                for eng in (fused, plain):
                    for p in eng.model.parameters():
                        p.mul_(0.5)
        a, b = fused.generate(batch), plain.generate(batch)
        assert fused.decoder.fusable
        assert [o.output_ids for o in a] == [o.output_ids for o in b]
        for x, y in zip(a, b, strict=True):
            assert x.output_logprobs == pytest.approx(y.output_logprobs, abs=1e-4)
