"""This machine as a cluster spec: the efficiency curves fitted to its profile's kernel points.

    python -m tetrad profile --spec-out THIS.yaml      # then: tetrad plan CFG --hardware THIS.yaml

The profile (tetrad.profiler) measures GEMMs by (m, n, k), causal attention by sequence
length, element-wise bandwidth, host<->device copies and disk reads by size, and collectives
by message size (alpha-beta fits); here each becomes the curve a spec carries
(tetrad.strategy.efficiency). A measured machine has no vendor peak: its peak is the fitted
GEMM asymptote (``gemm.top`` 1), its memory bandwidth the measured element-wise rate
(``memory_top`` 1). The same code reads a GPU machine's profile (whatever device it ran on).
"""

from __future__ import annotations

import math

import yaml

from tetrad.strategy.efficiency import fit_gemm, fit_saturating


def _attention(points: list[dict], peak: float) -> dict:
    """top and half_seq of the causal flash curve, from forward times: for each candidate
    half_seq the best top is the geometric mean of the per-point ratios (mean |log| error)."""
    best = None
    for half in (64, 128, 256, 512, 1024, 2048):
        logs = []
        for p in points:
            work = 0.5 * 4 * p["seq"] ** 2 * p["heads"] * p["head_dim"]   # causal half of QK^T and PV
            logs.append(math.log(work / (p["fwd_s"] * peak) / (p["seq"] / (p["seq"] + half))))
        top = math.exp(sum(logs) / len(logs))
        err = sum(abs(v - math.log(top)) for v in logs) / len(logs)
        if best is None or err < best[0]:
            best = (err, top, half)
    ratios = [p["bwd_s"] / p["fwd_s"] for p in points if p["fwd_s"] > 0 and p["bwd_s"] > 0]
    return {"top": round(min(best[1], 1.0), 4), "half_seq": best[2],
            "backward_ratio": round(sorted(ratios)[len(ratios) // 2], 3) if ratios else 2.5}


def _bus_half(profile: dict, placement: str) -> float | None:
    """Message size at which the all-reduce fit reaches half its bandwidth: alpha / beta."""
    fits = [f for key, f in (profile.get("collectives", {}).get("all_reduce") or {}).items()
            if key.endswith("/" + placement) and f["beta_s_per_byte"] > 0]
    if not fits:
        return None
    return float(sorted(f["alpha_s"] / f["beta_s_per_byte"] for f in fits)[len(fits) // 2])


def efficiency_from_profile(profile: dict) -> tuple[dict, float, float]:
    """(the ``efficiency`` mapping, peak FLOP/s, memory bytes/s) fitted to the profile."""
    k = profile.get("kernels")
    if not k:
        raise ValueError("the profile has no kernel measurements (an older profile): "
                         "re-profile with `tetrad profile --force`")
    gemm = fit_gemm([(p["m"], p["n"], p["k"], p["s"]) for p in k["gemm"]], peak_flops=None)
    peak = gemm.top                                          # FLOP/s: the measured asymptote
    mem = k["memory"]["bytes"] / k["memory"]["s"]
    eff = {"gemm": {"top": 1.0, "half_dim": gemm.half_dim}, "attention": _attention(k["attention"], peak),
           "memory_top": 1.0}
    for placement, key in (("intra", "intra_half_bytes"), ("inter", "inter_half_bytes")):
        half = _bus_half(profile, placement)
        if half is not None:
            eff[key] = half
    if k.get("host_device"):
        rate, half = fit_saturating([(p["bytes"], p["s"]) for p in k["host_device"]])
        eff["host_device"] = {"top": 1.0, "half": half}
        eff["_host_device_Bps"] = rate
    if profile.get("disk_by_size"):
        rate, half = fit_saturating([(p["bytes"], p["s"]) for p in profile["disk_by_size"]])
        eff["disk"] = {"top": 1.0, "half": half}
        eff["_disk_read_Bps"] = rate
    return eff, peak, mem


def spec_from_profile(profile: dict, name: str = "this-machine") -> dict:
    """A spec mapping (as a ``--hardware`` YAML holds it) for the profiled machine and world."""
    eff, peak, mem = efficiency_from_profile(profile)
    hw = profile["key"]["hardware"]
    precision = profile["key"]["model"]["precision"]
    world, local = hw["world"], hw["local_world"]
    bw = {}
    for kind in ("all_reduce",):
        for key, f in (profile.get("collectives", {}).get(kind) or {}).items():
            if f["beta_s_per_byte"] > 0:
                g = int(key.split("/")[0])
                # the fit is per full buffer; a ring moves 2(g-1)/g of it per rank
                bw.setdefault(key.split("/")[1], []).append((2 * (g - 1) / g / f["beta_s_per_byte"], f["alpha_s"]))
    intra = max(bw.get("intra", [(1e9, 1e-5)]))
    inter = max(bw.get("inter", [intra]))
    mem_info = profile["memory"]
    device_gib = mem_info["device_total_bytes"] / 2**30 / (local if mem_info["device"] == "cpu" else 1)
    spec = {
        "name": name, "accelerator": (hw.get("accelerator") or {}).get("name") or hw["cpu"],
        "nodes": max(1, world // local), "accelerators_per_node": local,
        "peak_tflops": {precision: round(peak / 1e12, 6)},
        "memory_gb": round(device_gib, 3), "context_gb": 0.0,
        "memory_bandwidth_GBps": round(mem / 1e9, 3),
        "intra_node": {"bandwidth_GBps": round(intra[0] / 1e9, 4), "efficiency": 1.0,
                       "latency_us": round(intra[1] * 1e6, 2)},
        "inter_node": {"bandwidth_GBps": round(inter[0] / 1e9, 4), "efficiency": 1.0,
                       "latency_us": round(inter[1] * 1e6, 2)},
        "nccl_mb_per_group": 0.0,
        # without an accelerator host memory is device memory: a "copy" runs at its bandwidth
        "host_device_GBps": round(eff.pop("_host_device_Bps", mem) / 1e9, 4),
        "disk_read_GBps": round(eff.pop("_disk_read_Bps", profile["disk"]["read_Bps"]) / 1e9, 4),
        "disk_write_GBps": round(profile["disk"]["write_Bps"] / 1e9, 4),
        "host_memory_gb": round((mem_info["host"].get("total_bytes") or 0) / 2**30, 3),
        "cpu_adam_s_per_param": profile["adam_s_per_param"],
        "efficiency": eff,
    }
    return spec


def spec_yaml(spec: dict, profile_path: str = "") -> str:
    head = ("# This machine as measured by `tetrad profile` (tetrad.strategy.machine_spec)"
            + (f" from {profile_path}" if profile_path else "") + ".\n"
            "# Peak = the fitted GEMM asymptote; memory bandwidth = the measured element-wise rate.\n")
    return head + yaml.safe_dump(spec, sort_keys=False)
