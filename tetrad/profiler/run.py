"""A whole profile: layers at every shard shape, collectives, memory, bandwidths.

``profile_world`` runs on every rank of an initialised world (all ranks measure at once, so
the contention a real step sees — ranks sharing cores, memory bandwidth, links — is in the
numbers); ``load_or_profile`` reuses a saved profile or measures one, spawning local ranks
when this is a plain process.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from tetrad.config.precision import compute_dtype
from tetrad.models.args import ModelArgs
from tetrad.profiler import collectives, kernels, layers, machine, store


@dataclass
class ProfileOptions:
    """How much to measure. `quick` trades precision for time (tests, `strategy: auto` on tiny models)."""

    mbs: list[int] = field(default_factory=lambda: [1, 2, 4])
    reps: int = 3
    comm_sizes: list[int] = field(default_factory=lambda: [1 << k for k in (12, 15, 18, 20, 22)])
    comm_reps: int = 3
    disk_bytes: int = 1 << 27
    disk_dir: str | None = None

    @classmethod
    def quick(cls, mbs: list[int] | None = None) -> "ProfileOptions":
        return cls(mbs=mbs or [1, 2], reps=2, comm_sizes=[1 << 12, 1 << 16, 1 << 20], comm_reps=2,
                   disk_bytes=1 << 24)


def shard_shapes(args: ModelArgs, world: int) -> list[tuple[int, int]]:
    """(tp, sp) pairs a layout on `world` ranks can give a rank: tp divides the heads (and kv
    heads), sp divides the heads left per tp rank and the sequence."""
    out = []
    for tp in range(1, world + 1):
        if world % tp or args.n_heads % tp or args.n_kv_heads % tp:
            continue
        for sp in range(1, world // tp + 1):
            if (world // tp) % sp == 0 and (args.n_heads // tp) % sp == 0 and args.seq_len % sp == 0:
                out.append((tp, sp))
    return out


def _mean_over_ranks(values: list[float], device) -> list[float]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return [v / world for v in collectives.reduce_floats(values, dist.ReduceOp.SUM, device)]


def measure_layers(args: ModelArgs, precision: str, world: int, opts: ProfileOptions, device) -> dict:
    """Per (tp, sp, micro-batch, policy): block forward/backward seconds; per (tp, sp, mbs):
    head seconds and activation bytes; per mbs: a whole tp1/sp1 micro-batch through the
    engine's gradient owner (``micro_batch``). Times are averaged over the ranks that ran them at once."""
    dtype = compute_dtype(precision)
    rows, heads, acts = [], [], []
    # A process's first passes run slowly (lazy kernel selection, allocator growth, autograd
    # and checkpoint setup): one throwaway pass keeps that out of the first shape's numbers.
    warm = layers.shard_block(args, 1, dtype, device)
    for policy in layers.POLICIES:
        layers.measure_layer(args, 1, 1, max(opts.mbs), policy, dtype, device, 1, warm)
    layers.measure_head(args, 1, 1, max(opts.mbs), dtype, device, 1)
    for tp, sp in shard_shapes(args, world):
        block = layers.shard_block(args, tp, dtype, device)
        for b in opts.mbs:
            for policy in layers.POLICIES:
                rows.append(layers.measure_layer(args, tp, sp, b, policy, dtype, device, opts.reps, block))
            heads.append(layers.measure_head(args, tp, sp, b, dtype, device, opts.reps))
            acts.append(layers.measure_activations(args, tp, sp, b, dtype, device))
    # The whole model through the engine's gradient owner, once per micro-batch size: what a
    # micro-batch costs beyond its layers and head (see layers.measure_micro_batch).
    built = layers.build_engine_model(args, precision, device)
    layers.measure_micro_batch(args, max(opts.mbs), precision, device, 1, built)  # warm-up
    micro = [layers.measure_micro_batch(args, b, precision, device, opts.reps, built) for b in opts.mbs]
    timed = rows + heads + micro
    flat = _mean_over_ranks([r[k] for r in timed for k in ("fwd_s", "bwd_s")], device)
    for i, r in enumerate(timed):
        r["fwd_s"], r["bwd_s"] = flat[2 * i], flat[2 * i + 1]
    return {"layers": rows, "head": heads, "activations": acts, "micro_batch": micro}


def measure_kernels(precision: str, device, reps: int) -> dict:
    """GEMM, attention, element-wise and copy rates by size (tetrad.profiler.kernels), every
    rank at once; the seconds are averaged over the ranks."""
    out = kernels.measure_all(device, compute_dtype(precision), reps)
    rows = out["gemm"] + out["attention"] + [out["memory"]]
    keys = [(r, k) for r in rows for k in ("s", "fwd_s", "bwd_s") if k in r]
    for (r, k), v in zip(keys, _mean_over_ranks([r[k] for r, k in keys], device)):
        r[k] = v
    return out


def profile_world(args: ModelArgs, precision: str, opts: ProfileOptions) -> dict:
    """Measure everything on the current world; every rank returns the same profile."""
    start = time.perf_counter()
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = machine.accelerator() or torch.device("cpu")
    profile = None
    with torch.random.fork_rng(devices=[]):  # profiling must not move training's RNG stream
        torch.manual_seed(0)
        measured = measure_layers(args, precision, world, opts, device)
        measured["kernels"] = measure_kernels(precision, device, opts.reps)
        split = {"layers_s": time.perf_counter() - start}
        comm = collectives.measure_all(opts.comm_sizes, opts.comm_reps, device, local_world) if world > 1 else {}
        overlap = collectives.measure_overlap(device) if world > 1 else 1.0
        split["collectives_s"] = time.perf_counter() - start - split["layers_s"]
        adam = _mean_over_ranks([layers.measure_optimizer(precision, device)], device)[0]
        contention = layers.measure_contention(device)
    if not dist.is_initialized() or dist.get_rank() == 0:
        profile = {
            "version": store.VERSION, "key": full_key(args, precision, world, local_world, opts),
            **measured, "collectives": comm, "overlap": overlap, "adam_s_per_param": adam,
            "contention": contention,
            "memory": machine.memory(), "host_device": machine.host_device_bandwidth(),
            "disk": machine.disk_bandwidth(opts.disk_dir, opts.disk_bytes),
            "disk_by_size": machine.disk_read_by_size(opts.disk_dir, min(opts.disk_bytes, 1 << 25)),
            "options": asdict(opts), "seconds": time.perf_counter() - start, "split": split,
        }
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [profile]
        dist.broadcast_object_list(box, src=0)  # every rank plans from the very same numbers
        profile = box[0]
    return profile


def full_key(args: ModelArgs, precision: str, world: int, local_world: int, opts: ProfileOptions) -> dict:
    return {"model": store.model_key(args, precision), "hardware": machine.fingerprint(world, local_world),
            "mbs": sorted(opts.mbs)}


def _spawned(args_dict: dict, precision: str, opts_dict: dict) -> dict:
    return profile_world(ModelArgs(**args_dict), precision, ProfileOptions(**opts_dict))


def measure(args: ModelArgs, precision: str, world: int, opts: ProfileOptions) -> dict:
    """Profile on the launched world if this process is part of one, else on spawned local ranks."""
    if dist.is_initialized():
        return profile_world(args, precision, opts)
    if world == 1:
        return profile_world(args, precision, opts)
    from tetrad.profiler.spawn import run_local

    return run_local(_spawned, world, asdict(args), precision, asdict(opts))


def expected_key(args: ModelArgs, precision: str, world: int, opts: ProfileOptions) -> dict:
    """The key a fresh profile would have here (spawned ranks all share this node)."""
    if dist.is_initialized():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        local = world
    # Spawned ranks run one thread each when they oversubscribe the cores, as training does.
    key = full_key(args, precision, world, local, opts)
    if not dist.is_initialized() and world > 1:
        key["hardware"]["threads"] = max(1, (os.cpu_count() or 1) // world)
    return key


def load_or_profile(args: ModelArgs, precision: str, world: int, path: str | os.PathLike | None = None,
                    force: bool = False, opts: ProfileOptions | None = None) -> tuple[dict, bool]:
    """(profile, reused): the saved profile at ``path`` if it matches, else a new one (saved there).

    In a launched world every rank must call this; rank 0 decides reuse for all of them.
    """
    opts = opts or ProfileOptions()
    key = expected_key(args, precision, world, opts)
    path = path or store.default_path(key)
    old = None if force else store.load(path)
    old = old if store.matches(old, key) else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [old]  # rank 0's file speaks for every rank (other nodes may not have it)
        dist.broadcast_object_list(box, src=0)
        old = box[0]
    if old is not None:
        return old, True
    profile = measure(args, precision, world, opts)
    if not dist.is_initialized() or dist.get_rank() == 0:
        store.save(profile, path)
    return profile, False
