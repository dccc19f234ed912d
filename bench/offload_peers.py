"""The largest Llama-style model DeepSpeed ZeRO-3 (resident, CPU offload, NVMe offload) and
torch FSDP2 train on this machine, and their step time there: the peers tetrad's offload
(``bench/offload_scale.py``) is compared with.

    python bench/offload_peers.py --nvme-dir /tmp/offl/peers [--peers deepspeed-z3,fsdp2]
        [--sizes 0.5,1,2] [--steps 2] [--seq 64] [--rss-cap-gb 20] [--timeout 1500]

Peers (``--peers``, default all):

* ``deepspeed-z3``: ZeRO-3, every model state in host memory, no offload;
* ``deepspeed-z3-cpu``: ZeRO-3 with ``offload_optimizer`` and ``offload_param`` on ``cpu``;
* ``deepspeed-infinity``: ZeRO-3 with both on ``nvme`` under ``--nvme-dir`` (ZeRO-Infinity,
  DeepSpeed's libaio ``async_io`` op);
* ``fsdp2``: torch ``fully_shard`` on every transformer block and the root, world 1 on gloo.

Same model ladder and batch as ``offload_scale.py`` (vocab 32000, heads of 128, SwiGLU; sizes
are nominal billions, the JSON carries the exact count; 0.75, 0.9, 1.25, 1.5, 2.5, 2.75 and 3
are extra rungs here), fp32, AdamW (lr 1e-4, torch's default weight decay 0.01), gradient
clipping 1.0, micro-batch 1 x ``--seq`` tokens, ``--steps`` optimizer steps on one fixed batch
(so the loss must fall). Every peer builds the model without ever materialising it whole in
one place: DeepSpeed under ``deepspeed.zero.Init`` (each module is partitioned -- and for the offload
peers moved to its offload device -- as soon as it is constructed), FSDP2 on the meta device,
sharded, then ``to_empty`` and initialised. Parameters get tetrad's per-name initial values
(``tetrad.models.init_parameter``), so losses are comparable with tetrad's runs.

Each (peer, size) runs in a fresh process, so its peak RSS is its own. The parent polls the
child's process-tree RSS every 0.5 s and kills the tree above ``--rss-cap-gb`` (the machine has
23 GiB and no swap: an OOM would take other work down with it), when the machine's
MemAvailable falls under ``--min-avail-gb`` (other jobs), and after ``--timeout`` seconds. An
NVMe size whose files (~18 bytes/param) would not fit in the free disk (and in
``--disk-cap-gb``) with 10% headroom is skipped. Each peer walks its ladder smallest first and
stops at the first size that fails. One JSON line per (peer, size), then one summary line per
peer: its largest completed size and the last step's seconds there.

Per size: ``params``, ``peak_rss_gb`` (GiB: the highest of the polled process-tree RSS and the
child's ``ru_maxrss``), ``step_s`` and ``losses`` per step, ``init_s`` (build, initial values,
engine/optimizer set-up), ``disk_gb`` (NVMe files, decimal GB, peak), ``optimizer``,
``loadavg`` (the machine is shared: timings under load are not comparable), and ``failed`` with
the ``stage`` it died in (log kept) or ``skipped``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

# The repository root, so that `tetrad` imports from this checkout in the parent and children.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from offload_scale import SIZES, model_cfg  # noqa: E402  (one ladder for tetrad and its peers)

PEERS = ["deepspeed-z3", "fsdp2", "deepspeed-z3-cpu", "deepspeed-infinity"]
NVME_BYTES_PER_PARAM = 18  # DeepSpeed's swap files, fp32: 18.0 B/param measured at 2.05 B
LR, WEIGHT_DECAY, SEED, VOCAB = 1e-4, 0.01, 0, 32000
STAGE_MARK = "@offload_peers stage: "


def num_params(size: float) -> int:
    """Exact count, from a meta-device build (shapes only, nothing allocated)."""
    from tetrad.models import build_model

    return sum(p.numel() for p in build_model(model_cfg(size, 64), device="meta").parameters())


# --------------------------------------------------------------------------- child: peers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_rank_env() -> None:
    """A world of one, as a launcher would set it up (DeepSpeed and torch read these)."""
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})


def _stage(name: str) -> None:
    """Mark progress in the child's log, so that a killed run says where it died."""
    print(f"{STAGE_MARK}{name}", flush=True)


def ds_config(peer: str, nvme_dir: str, largest_numel: int) -> dict:
    """ZeRO-3 config, fp32 (no fp16/bf16 section), tuned so that DeepSpeed reaches its memory
    limit rather than its GPU-oriented defaults': the optimizer steps one sub-group at a time
    and torch's AdamW makes group-sized temporaries (the NVMe swapper 4 group-sized buffers), so
    sub_group_size 5e7 rather than 1e9; the contiguous-gradient bucket is allocated whole, so
    reduce_bucket_size 5e7 rather than 5e8 (2 GB in fp32). pin_memory is off: no CUDA here.
    ``largest_numel``: the largest parameter, which each parameter swap buffer must hold."""
    zero = {"stage": 3, "sub_group_size": int(5e7), "reduce_bucket_size": int(5e7),
            "contiguous_gradients": True, "overlap_comm": False,
            # The defaults (1e9 each) keep every gathered parameter of a <1e9 model alive from
            # forward to backward -- a full extra fp32 copy of the model, and for NVMe more
            # parameters than swap buffers ("Not enough buffers"). Release after use instead.
            "stage3_max_live_parameters": int(1e8), "stage3_max_reuse_distance": 0}
    if peer == "deepspeed-z3-cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    elif peer == "deepspeed-infinity":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": False,
                                     "buffer_count": 4, "fast_init": False}
        # max_in_cpu 0, not the default 1e9: DeepSpeed otherwise swaps up to 1e9 parameters'
        # partitions back in "permanently to CPU" (4 GB in fp32), which is not NVMe offload.
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": False,
                                 "buffer_count": 5, "buffer_size": largest_numel, "max_in_cpu": 0}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "zero_optimization": zero,
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
           "wall_clock_breakdown": False}
    if peer == "deepspeed-infinity":
        cfg["aio"] = {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1,
                      "single_submit": False, "overlap_events": True}
    return cfg


def _ds_tetrad_init(model, n_layers: int) -> None:
    """Give every parameter tetrad's per-name initial value, one module at a time: gather its
    (partitioned, possibly swapped-out) parameters, fill them, let DeepSpeed re-partition."""
    import deepspeed

    from tetrad.models import init_parameter

    for mname, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
            for pname, p in own:
                init_parameter(f"{mname}.{pname}" if mname else pname, p.data, SEED, n_layers)


def build_deepspeed(peer: str, cfg: dict, nvme_dir: str):
    """-> (step(x, y) -> loss, optimizer name)."""
    import deepspeed
    import torch

    from tetrad.models import build_model
    from tetrad.models.loss import cross_entropy

    _single_rank_env()
    deepspeed.init_distributed(dist_backend="gloo")
    config = ds_config(peer, nvme_dir, largest_numel=VOCAB * cfg["d_model"])  # the embedding
    # Every module is partitioned (and for the offload peers sent to cpu/nvme) right after its
    # own __init__, so the whole model never exists in one place. tetrad's Transformer builds its
    # layers under torch.device("meta") then materialises; zero.Init's tensor constructors put
    # them on the CPU instead and the materialise step sees only empty partitioned parameters,
    # so the real values come from _ds_tetrad_init below.
    # No dtype argument: DeepSpeed 0.19.8's zero.Init reads a given dtype through
    # `dtype or torch.float16 if fp16 supported else torch.bfloat16 if is_bf16_supported ...`,
    # which on a CPU (no fp16, and the unbound method is truthy) yields bf16 whatever was
    # passed -- bf16 GEMMs in torch's reference kernel, 20x+ slower. From the config alone (no
    # bf16/fp16 section) it takes torch.float.
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = build_model(cfg, seed=SEED)
    _stage("init values")
    _ds_tetrad_init(model, cfg["n_layers"])
    params = list(model.parameters())
    if peer == "deepspeed-z3":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        opt_name = "torch.optim.AdamW"
    else:  # the offload peers step on the host with DeepSpeed's own vectorised CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=LR, weight_decay=WEIGHT_DECAY, adamw_mode=True)
        opt_name = "deepspeed.ops.adam.DeepSpeedCPUAdam"
    _stage("deepspeed.initialize")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config,
                                      dist_init_required=False)

    def step(x, y):
        loss = cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        return float(loss)
    return step, opt_name


def build_fsdp2(cfg: dict):
    """Meta-device build, fully_shard per block and root, then to_empty + per-name init on the
    shards (FSDP2's documented flow: no full copy is ever allocated)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tetrad.models import Attention, build_model, init_parameter
    from tetrad.models.loss import cross_entropy

    _single_rank_env()
    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    model = build_model(cfg, seed=SEED, device="meta")
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _stage("to_empty + init values")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            # World 1: the local shard is the whole parameter; fill it by its name.
            init_parameter(name, p.to_local(), SEED, cfg["n_layers"])
        for m in model.modules():
            if isinstance(m, Attention):
                m.reset_rope()  # non-persistent buffers left uninitialised by to_empty
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(x, y):
        loss = cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return step, "torch.optim.AdamW"


def child(peer: str, size: float, steps: int, seq: int, nvme_dir: str) -> dict:
    import torch

    _stage("build")
    torch.manual_seed(SEED)
    cfg = model_cfg(size, seq)
    t0 = time.perf_counter()
    if peer == "fsdp2":
        step, opt_name = build_fsdp2(cfg)
    else:
        step, opt_name = build_deepspeed(peer, cfg, nvme_dir)
    init_s = time.perf_counter() - t0
    tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    times, losses = [], []
    for i in range(steps):
        _stage(f"step {i + 1}")
        t = time.perf_counter()
        losses.append(step(x, y))
        times.append(time.perf_counter() - t)
    return {"optimizer": opt_name, "init_s": init_s, "step_s": times, "losses": losses,
            "child_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# --------------------------------------------------------------------------- parent

def _tree_rss(pid: int) -> int:
    """Bytes resident in process ``pid`` and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _mem_available() -> int:
    """The kernel's MemAvailable, bytes: what every job on the machine still has."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _last_stage(log_path: str) -> str:
    stage = "start"
    with open(log_path, errors="replace") as f:
        for line in f:
            if line.startswith(STAGE_MARK):
                stage = line[len(STAGE_MARK):].strip()
    return stage


def _wait_for_memory(args) -> float:
    """Seconds spent waiting (up to --timeout) until the machine has room for a child at the
    RSS cap: a size started while other jobs hold the memory would only hit the guard."""
    start = time.monotonic()
    need = (args.rss_cap_gb + args.min_avail_gb) * 2**30
    while _mem_available() < need and time.monotonic() - start < args.timeout:
        time.sleep(5)
    return time.monotonic() - start


def _watch(proc: subprocess.Popen, nvme: str, args) -> tuple[int, int, str | None]:
    """Poll the child every 0.5 s until it exits; kill its tree at the RSS cap, when the machine
    runs short of memory, or at the timeout. -> (peak RSS, peak NVMe bytes, why killed)."""
    peak_rss, peak_disk, start = 0, 0, time.monotonic()
    while proc.poll() is None:
        rss = _tree_rss(proc.pid)
        peak_rss = max(peak_rss, rss)
        if nvme:
            peak_disk = max(peak_disk, _du(nvme))
        failed = None
        if rss > args.rss_cap_gb * 2**30:
            failed = f"rss cap {args.rss_cap_gb:g} GB exceeded"
        elif _mem_available() < args.min_avail_gb * 2**30:
            # Other jobs hold the rest: stop before the kernel OOM-kills someone. Not the
            # peer's own limit -- rerun when the machine is quieter.
            failed = (f"machine memory low: MemAvailable < {args.min_avail_gb:g} GB "
                      f"at {rss / 2**30:.1f} GB RSS (other jobs running)")
        elif time.monotonic() - start > args.timeout:
            failed = f"timeout {args.timeout} s"
        if failed:
            _kill_tree(proc.pid)
            proc.wait()
            return peak_rss, peak_disk, failed
        time.sleep(0.5)
    return peak_rss, peak_disk, None


def run_size(peer: str, size: float, args) -> dict:
    """One (peer, size) in a fresh process, watched for RSS, time and (NVMe) disk use."""
    waited = _wait_for_memory(args)
    nvme = os.path.join(args.nvme_dir, f"{peer}-{size}") if peer == "deepspeed-infinity" else ""
    if nvme:
        os.makedirs(nvme, exist_ok=True)
    fd, result_path = tempfile.mkstemp(prefix="offload_peers_", suffix=".json")
    os.close(fd)
    log_path = result_path[:-5] + ".log"
    # "-": the peers that do not swap ignore --nvme-dir
    cmd = [sys.executable, os.path.abspath(__file__), "--child", peer, str(size), result_path,
           "--steps", str(args.steps), "--seq", str(args.seq), "--nvme-dir", nvme or "-"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    row = {"peer": peer, "size_b": size, "params": num_params(size)}
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak_rss, peak_disk, failed = _watch(proc, nvme, args)
    try:
        with open(result_path) as f:
            got = json.load(f)
    except (OSError, ValueError):
        got = {}
    if failed is None and proc.returncode != 0:
        failed = got.get("error") or (f"killed by signal {-proc.returncode} (kernel OOM?)"
                                      if proc.returncode < 0 else f"exit {proc.returncode}")
    row.update({k: v for k, v in got.items() if k not in ("error", "traceback")})
    row["peak_rss_gb"] = round(max(peak_rss / 2**30, got.get("child_peak_rss_gb", 0)), 2)
    row.pop("child_peak_rss_gb", None)
    if "step_s" in row:
        row["step_s"] = [round(s, 2) for s in row["step_s"]]
        row["init_s"] = round(row["init_s"], 1)
    if nvme:
        row["disk_gb"] = round(peak_disk / 1e9, 2)
        shutil.rmtree(nvme, ignore_errors=True)  # the next size needs the space
    row["wall_s"] = round(time.monotonic() - start, 1)
    if waited >= 1:
        row["waited_for_memory_s"] = round(waited)
    row["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    if failed:
        row["failed"] = failed
        row["stage"] = _last_stage(log_path)
        row["log"] = log_path  # kept for the traceback
    else:
        os.unlink(log_path)
    os.unlink(result_path)
    return row


def nvme_skip_reason(size: float, args) -> str | None:
    """Why an NVMe size cannot run (its files would not fit), or None."""
    need = NVME_BYTES_PER_PARAM * num_params(size) * 1.1
    free = shutil.disk_usage(args.nvme_dir).free
    room = min(free, args.disk_cap_gb * 1e9)
    if need > room:
        return (f"needs ~{need / 1e9:.0f} GB of disk ({NVME_BYTES_PER_PARAM} B/param + 10%), "
                f"{free / 1e9:.0f} GB free, cap {args.disk_cap_gb:g} GB")
    return None


def walk_ladder(peer: str, sizes: list[float], args) -> dict:
    """Smallest first; stop at the first failure. -> the summary line."""
    best, limit = None, "end of ladder"
    for size in sizes:
        reason = nvme_skip_reason(size, args) if peer == "deepspeed-infinity" else None
        if reason:
            row = {"peer": peer, "size_b": size, "params": num_params(size), "skipped": reason}
        else:
            row = run_size(peer, size, args)
        print(json.dumps(row), flush=True)
        if "failed" in row or "skipped" in row:
            limit = f"{size}: {row.get('failed') or row.get('skipped')}"
            break
        best = row
    summary = {"summary": peer, "limited_by": limit}
    if best:
        summary.update({"largest_size_b": best["size_b"], "params": best["params"],
                        "peak_rss_gb": best["peak_rss_gb"], "s_per_step": best["step_s"][-1],
                        "optimizer": best["optimizer"]})
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=",".join(PEERS), help="comma list from " + ",".join(PEERS))
    ap.add_argument("--sizes", default="0.5,1,1.5,2,2.5,3", help="billions, from " + str(list(SIZES)))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--nvme-dir", help="swap directory (required for deepspeed-infinity)")
    ap.add_argument("--rss-cap-gb", type=float, default=20.0)
    ap.add_argument("--disk-cap-gb", type=float, default=55.0)
    ap.add_argument("--min-avail-gb", type=float, default=1.0,
                    help="kill the child when the machine's MemAvailable falls below this")
    ap.add_argument("--timeout", type=int, default=1500, help="seconds per size")
    ap.add_argument("--child", nargs=3, metavar=("PEER", "SIZE", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        peer, size, result_path = args.child
        try:
            out = child(peer, float(size), args.steps, args.seq, args.nvme_dir)
            code = 0
        except Exception as e:  # noqa: BLE001 - reported by the parent
            traceback.print_exc()
            out, code = {"error": f"{type(e).__name__}: {e}"[:500]}, 1
        with open(result_path, "w") as f:
            json.dump(out, f)
        sys.stdout.flush()
        os._exit(code)  # skip DeepSpeed's/gloo's atexit teardown: nothing left to save
    peers = args.peers.split(",")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        ap.error(f"unknown peers {unknown}")
    if "deepspeed-infinity" in peers and not args.nvme_dir:
        ap.error("--nvme-dir is required for deepspeed-infinity")
    if args.nvme_dir:
        os.makedirs(args.nvme_dir, exist_ok=True)
    sizes = [float(s) for s in args.sizes.split(",")]
    sizes = [int(s) if s.is_integer() else s for s in sizes]
    missing = [s for s in sizes if s not in SIZES]
    if missing:
        ap.error(f"sizes {missing} not in {list(SIZES)}")
    summaries = [walk_ladder(peer, sizes, args) for peer in peers]
    for s in summaries:
        print(json.dumps(s), flush=True)


if __name__ == "__main__":
    main()
