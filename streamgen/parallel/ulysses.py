"""DeepSpeed-Ulysses sequence parallelism for attention (offline high-resolution renders).

Each of P ranks holds a contiguous shard of the token sequence. Before attention an all-to-all
turns "my tokens, all heads" into "all tokens, my H/P heads"; attention runs on full sequences for
a subset of heads (so any positional scheme that needs the whole sequence — 3D RoPE, the
block-causal mask, a cache policy — works unchanged); a second all-to-all brings the output back
to "my tokens, all heads". Traffic per layer is 4 all-to-alls of the activations (spec serving
§4.4): this is for long high-resolution renders, never for interactive streaming, where it costs
more than it saves.

Two implementations, same numerics:
- `deepspeed`: `deepspeed.sequence.layer.DistributedAttention` (scatter heads, gather sequence). On
  CPU it needs `deepspeed.init_distributed(dist_backend="gloo")` on top of torch.distributed, and
  we skip its 45 s JIT build of the shm op (spec ecosystem §3): `init_sequence_parallel` does both.
  It needs equal shards (sequence length divisible by P).
- `native`: the same two all-to-alls with `torch.distributed.all_to_all` (works on gloo, NCCL);
  also handles uneven shards (e.g. 1,560 tokens per frame over 7 ranks) — pass `sizes`.
Both need the head count divisible by P.

`SequenceParallelAttention` is the attention option at the DiT's seam: it wraps any full-sequence
`SelfAttentionContext` (e.g. `BlockCausalAttention`, which applies RoPE over the whole grid) so a
rank calls it with its token shard. Running a whole DiT forward sequence-parallel additionally
needs the DiT to take a token shard (its patch embedding, per-frame modulation and unpatchify are
token-local, so that is slicing, not communication) — see the report for the change in dit.py.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..models.attention import SelfAttentionContext, TokenGrid, attention

IMPLS = ("auto", "deepspeed", "native")


def skip_deepspeed_shm_build() -> None:
    """Make `deepspeed.init_distributed()` skip JIT-compiling its shm op (45–49 s with g++ on CPU).
    Must patch the module object in sys.modules: `import deepspeed.comm.torch` returns torch itself."""
    import deepspeed  # noqa: F401

    mod = sys.modules.get("deepspeed.comm.torch")
    if mod is not None and hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None


def init_sequence_parallel(backend: str = "gloo", deepspeed: bool = True, rank: int | None = None,
                           world_size: int | None = None) -> dist.ProcessGroup:
    """torch.distributed (env:// rendezvous: MASTER_ADDR/PORT, RANK, WORLD_SIZE) and, optionally,
    DeepSpeed's comm on top of it (reusing the torch group). Returns the sequence-parallel group."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if backend == "gloo" else os.environ.get("DS_ACCELERATOR", "cuda"))
    if not dist.is_initialized():
        kwargs = {} if rank is None else {"rank": rank, "world_size": world_size}
        dist.init_process_group(backend, **kwargs)
    if deepspeed:
        skip_deepspeed_shm_build()
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend)
    return dist.group.WORLD


def shard_sizes(length: int, world: int) -> list[int]:
    """Contiguous shard lengths, earlier ranks taking the remainder."""
    base, extra = divmod(length, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard(x: Tensor, rank: int, world: int, dim: int = 1, sizes: Sequence[int] | None = None) -> Tensor:
    """Rank `rank`'s contiguous slice of `x` along `dim`."""
    sizes = list(sizes or shard_sizes(x.shape[dim], world))
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank])


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _exchange(pieces: list[Tensor], recv_shapes: list[tuple[int, ...]], group) -> list[Tensor]:
    """Send pieces[p] to rank p, receive a tensor of recv_shapes[q] from each rank q: one
    `all_to_all_single` over flat buffers (gloo's list all_to_all refuses unequal sizes)."""
    send = torch.cat([p.reshape(-1) for p in pieces])
    out_sizes = [int(torch.Size(sh).numel()) for sh in recv_shapes]
    recv = send.new_empty(sum(out_sizes))
    dist.all_to_all_single(recv, send, output_split_sizes=out_sizes, input_split_sizes=[p.numel() for p in pieces],
                           group=group)
    return [part.view(sh) for part, sh in zip(recv.split(out_sizes), recv_shapes)]


def seq_to_heads(x: Tensor, group=None, sizes: Sequence[int] | None = None) -> Tensor:
    """[B, s_r, H, D] (my tokens, all heads) → [B, S, H/P, D] (all tokens, my heads)."""
    world, rank = _world(group)
    b, s, h, d = x.shape
    if h % world:
        raise ValueError(f"{h} heads cannot be split over {world} ranks")
    sizes = list(sizes) if sizes is not None else [s] * world
    if sizes[rank] != s:
        raise ValueError(f"rank {rank} holds {s} tokens, the shard plan says {sizes[rank]}")
    got = _exchange(list(x.chunk(world, dim=2)), [(b, sizes[q], h // world, d) for q in range(world)], group)
    return torch.cat(got, dim=1)


def heads_to_seq(y: Tensor, group=None, sizes: Sequence[int] | None = None) -> Tensor:
    """[B, S, H/P, D] (all tokens, my heads) → [B, s_r, H, D] (my tokens, all heads)."""
    world, rank = _world(group)
    b, total, hp, d = y.shape
    sizes = list(sizes) if sizes is not None else shard_sizes(total, world)
    if sum(sizes) != total:
        raise ValueError(f"shard plan {sizes} does not cover {total} tokens")
    got = _exchange(list(y.split(sizes, dim=1)), [(b, sizes[rank], hp, d)] * world, group)
    return torch.cat(got, dim=2)


def _deepspeed_ready() -> bool:
    try:
        import deepspeed.comm as dscomm

        return bool(dscomm.is_initialized())
    except Exception:
        return False


class UlyssesAttention(torch.nn.Module):
    """Attention over a sequence sharded across ranks: q, k, v [B, s_r, H, D] → out [B, s_r, H, D].

    `local_attention(q, k, v, *extra)` sees full sequences and H/P heads. impl: "deepspeed"
    (DistributedAttention), "native" (torch.distributed all-to-all), "auto" (deepspeed when its comm
    is initialized and the shards are equal, else native).
    """

    def __init__(self, local_attention: Callable[..., Tensor] = attention, group=None, impl: str = "auto",
                 sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown Ulysses implementation {impl!r}; known: {', '.join(IMPLS)}")
        self.local_attention = local_attention
        self.group = group if group is not None else dist.group.WORLD
        self.sizes = list(sizes) if sizes is not None else None
        even = self.sizes is None or len(set(self.sizes)) == 1
        if impl == "auto":
            impl = "deepspeed" if even and _deepspeed_ready() else "native"
        if impl == "deepspeed":
            if not even:
                raise ValueError("DeepSpeed's DistributedAttention needs equal shards; use impl='native' for uneven ones")
            from deepspeed.sequence.layer import DistributedAttention

            self._ds = DistributedAttention(self._local, self.group, scatter_idx=2, gather_idx=1)
        self.impl = impl

    def _local(self, q: Tensor, k: Tensor, v: Tensor, *extra) -> Tensor:
        return self.local_attention(q, k, v, *extra)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *extra) -> Tensor:
        if self.impl == "deepspeed":
            return self._ds(q, k, v, 0, None, *extra)
        full = [seq_to_heads(t, self.group, self.sizes) for t in (q, k, v)]
        return heads_to_seq(self.local_attention(*full, *extra), self.group, self.sizes)


class SequenceParallelAttention(SelfAttentionContext):
    """The attention option for a DiT forward whose tokens are sharded across ranks: wraps a
    full-sequence context (`inner`, e.g. `BlockCausalAttention`) that is called with all tokens of
    H/P heads and the full `grid`, so RoPE and masks see true positions."""

    def __init__(self, inner: SelfAttentionContext, grid: TokenGrid, group=None, impl: str = "auto",
                 sizes: Sequence[int] | None = None) -> None:
        self.inner, self.grid = inner, grid
        self.ulysses = UlyssesAttention(self._attend, group, impl, sizes)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        return self.inner(layer, q, k, v, self.grid)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        return self.ulysses(q, k, v, layer)


# --- parity check: P gloo ranks vs one process ----------------------------------------------------
def _parity_rank(rank: int, world: int, port: int, out_dir: str, threads: int) -> None:
    """One rank of `check_parity` (module level so torch.multiprocessing can spawn it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(threads)
    errors: dict[str, float] = {}
    try:
        init_sequence_parallel("gloo", deepspeed=True, rank=rank, world_size=world)
        gen = torch.Generator().manual_seed(0)
        b, s, h, d = 2, 64, 4, 16
        q, k, v = (torch.randn(b, s, h, d, generator=gen) for _ in range(3))
        ref = attention(q, k, v)
        mine = lambda t: shard(t, rank, world)  # noqa: E731
        for impl in ("deepspeed", "native"):
            out = UlyssesAttention(attention, impl=impl)(mine(q), mine(k), mine(v))
            errors[f"attention/{impl}"] = float((out - mine(ref)).abs().max())
        # uneven shards (native only): 2 frames of 5×5 tokens over `world` ranks
        s2 = 50
        q2, k2, v2 = (torch.randn(b, s2, h, d, generator=gen) for _ in range(3))
        k_small = s2 // world - 3
        sizes = [s2 - (world - 1) * k_small] + [k_small] * (world - 1)  # e.g. [28, 22]
        part = lambda t: shard(t, rank, world, sizes=sizes)  # noqa: E731
        out = UlyssesAttention(attention, impl="native", sizes=sizes)(part(q2), part(k2), part(v2))
        errors["attention/native-uneven"] = float((out - part(attention(q2, k2, v2))).abs().max())
        # the DiT's block-causal self-attention with 3D RoPE over the full grid
        from ..models.attention import BlockCausalAttention
        from ..models.rope import Rope3D

        grid = TokenGrid(6, 4, 4)
        q3, k3, v3 = (torch.randn(1, 96, h, d, generator=gen) for _ in range(3))
        inner = BlockCausalAttention(Rope3D(d), frames_per_block=3, start_frame=5)
        ref3 = inner(0, q3, k3, v3, grid)
        for impl in ("deepspeed", "native"):
            out = SequenceParallelAttention(inner, grid, impl=impl)(0, mine(q3), mine(k3), mine(v3), grid)
            errors[f"block_causal_rope/{impl}"] = float((out - mine(ref3)).abs().max())
    except Exception as exc:  # reported to the parent, which fails with the message
        errors["error"] = f"{type(exc).__name__}: {exc}"  # type: ignore[assignment]
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def check_parity(world: int = 2, threads: int = 1) -> dict[int, dict[str, float]]:
    """Spawn `world` gloo ranks; each compares its shard of sequence-parallel attention (DeepSpeed and
    native, even and uneven shards, block-causal + RoPE) with single-process attention. Returns the
    max |Δ| per check per rank."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_parity_rank, args=(world, port, out_dir, threads), nprocs=world, join=True)
        results = {}
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                results[r] = json.load(f)
    return results


if __name__ == "__main__":  # python -m streamgen.parallel.ulysses
    print(json.dumps(check_parity(), indent=1))
