"""DeepSpeed-Ulysses sequence parallelism on 2 gloo ranks (torch.multiprocessing) equals
single-process attention: DeepSpeed's DistributedAttention and the native all-to-all, even and
uneven shards, and the DiT's block-causal self-attention with 3D RoPE over the full grid."""
from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

from streamgen.parallel.ulysses import check_parity, shard, shard_sizes  # noqa: E402

CHECKS = ["attention/deepspeed", "attention/native", "attention/native-uneven",
          "block_causal_rope/deepspeed", "block_causal_rope/native"]


def test_shard_plan() -> None:
    import torch

    assert shard_sizes(50, 2) == [25, 25] and shard_sizes(7, 3) == [3, 2, 2]
    x = torch.arange(10).view(1, 10)
    assert shard(x, 1, 2).tolist() == [[5, 6, 7, 8, 9]]
    assert shard(x, 0, 2, sizes=[7, 3]).tolist() == [[0, 1, 2, 3, 4, 5, 6]]


def test_two_gloo_ranks_equal_single_process_attention() -> None:
    results = check_parity(world=2)
    assert set(results) == {0, 1}
    for rank, errors in results.items():
        assert "error" not in errors, f"rank {rank}: {errors.get('error')}"
        assert sorted(errors) == sorted(CHECKS)
        for check, err in errors.items():
            assert err <= 1e-5, f"rank {rank} {check}: max |Δ| {err}"
