"""A human-readable summary of a profile, with the activation cross-check against the paper."""

from __future__ import annotations

from tetrad.models.args import ModelArgs


def paper_layer_bytes(args: ModelArgs, tp: int, sp: int, b: int, policy: str, precision: str) -> float:
    """Korthikanti et al.'s bytes per layer at this shard shape, scaled from 16-bit to the
    precision. The s^2 term is dropped when dropout is 0: PyTorch SDPA then takes a fused
    kernel that never stores the attention matrix."""
    s, h, a = args.seq_len / sp, args.d_model, args.n_heads
    scores = 5 * a * s / (h * tp) if args.dropout > 0 else 0.0
    per = {"none": s * b * h * (10 + 24 / tp + scores), "selective": s * b * h * (10 + 24 / tp),
           "full": 2 * s * b * h}[policy]
    return per * (2 if precision == "fp32" else 1)


def summary(profile: dict, args: ModelArgs, precision: str) -> str:
    lines = [f"profile v{profile['version']} for {profile['key']['model']} on "
             f"{profile['key']['hardware']['cpu']} (world {profile['key']['hardware']['world']})",
             "layer (tp, sp, mbs, policy): fwd ms, bwd ms"]
    for r in profile["layers"]:
        lines.append(f"  {r['tp']}, {r['sp']}, {r['mbs']}, {r['policy']:<9} {1e3 * r['fwd_s']:8.3f} {1e3 * r['bwd_s']:8.3f}")
    lines.append("activations per layer (tp, sp, mbs, policy): measured MB, Korthikanti MB, ratio")
    for r in profile["activations"]:
        for policy, n in r["bytes"].items():
            paper = paper_layer_bytes(args, r["tp"], r["sp"], r["mbs"], policy, precision)
            lines.append(f"  {r['tp']}, {r['sp']}, {r['mbs']}, {policy:<9} {n / 2**20:8.3f} {paper / 2**20:8.3f} "
                         f"{n / paper if paper else float('nan'):6.2f}")
    lines.append("collectives: alpha us, bandwidth GB/s (1/beta)")
    for kind, fits in profile["collectives"].items():
        for where, f in fits.items():
            bw = 1 / f["beta_s_per_byte"] / 1e9 if f["beta_s_per_byte"] else float("inf")
            lines.append(f"  {kind:<15} {where:<10} {1e6 * f['alpha_s']:9.1f} {bw:9.3f}")
    lines += _kernel_lines(profile.get("kernels"))
    mem, disk = profile["memory"], profile["disk"]
    lines.append(f"memory: {mem['device']} free {mem['device_free_bytes'] / 1e9:.1f} GB of "
                 f"{mem['device_total_bytes'] / 1e9:.1f} GB")
    lines.append(f"disk ({disk['dir']}): write {disk['write_Bps'] / 1e6:.0f} MB/s, read {disk['read_Bps'] / 1e6:.0f} MB/s")
    hd = profile.get("host_device")
    lines.append("host-device: " + (f"{hd['h2d_Bps'] / 1e9:.1f} GB/s up, {hd['d2h_Bps'] / 1e9:.1f} GB/s down"
                                    if hd else "none (no accelerator)"))
    lines.append(f"communication hidden behind compute: {100 * profile['overlap']:.0f}%; "
                 f"AdamW {1e9 * profile['adam_s_per_param']:.2f} ns/parameter")
    contention = profile.get("contention") or {}
    lines.append(f"ranks sharing cores: all {contention.get('ranks', 1)} busy run "
                 f"{contention.get('slowdown', 1.0):.2f}x slower than one alone")
    return "\n".join(lines)


def _kernel_lines(k: dict | None) -> list[str]:
    """Measured kernel rates by size (the points tetrad.strategy.machine_spec fits)."""
    if not k:
        return ["kernels: not measured (a profile from before kernel rates; re-profile with --force)"]
    lines = [f"GEMM ({k['dtype']}, m x n x k): GFLOP/s"]
    for p in k["gemm"]:
        lines.append(f"  {p['m']:>5} x {p['n']:>5} x {p['k']:>5} {2 * p['m'] * p['n'] * p['k'] / p['s'] / 1e9:10.2f}")
    lines.append("causal attention (seq): forward GFLOP/s (the causal half), backward / forward time")
    for p in k["attention"]:
        work = 2 * p["seq"] ** 2 * p["heads"] * p["head_dim"]
        lines.append(f"  {p['seq']:>6} {work / p['fwd_s'] / 1e9:10.2f} {p['bwd_s'] / p['fwd_s']:8.2f}")
    m = k["memory"]
    lines.append(f"element-wise add: {m['bytes'] / m['s'] / 1e9:.2f} GB/s")
    for p in k.get("host_device") or []:
        lines.append(f"  host->device {p['bytes']:>10} B: {p['bytes'] / p['s'] / 1e9:.2f} GB/s")
    return lines
