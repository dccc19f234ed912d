"""Published runs: the schema check, unit conversions, the fit/test discipline, the targets."""

import copy
import dataclasses

import pytest
import yaml

from tetrad.strategy import calibrate
from tetrad.strategy.hardware import calibration
from tetrad.strategy.published import PublishedError, load_file, load_published, megatron_flops

GOOD = {
    "source": {"id": "s", "title": "a table", "url": "https://example.org/table"},
    "software": {"attention": "flash"},
    "defaults": {"hardware": "a100_80gb", "precision": "bf16"},
    "runs": [{"id": "r1", "table": "row 1", "gpus": 8, "global_batch": 16, "split": "fit",
              "model": {"arch": "llama", "vocab_size": 32000, "d_model": 2048, "n_layers": 16,
                        "n_heads": 16, "seq_len": 2048},
              "layout": {"zero": 3, "micro_batch_size": 2, "recompute": "full"},
              "throughput": {"tokens_per_s_per_gpu": 1000}}],
}


def _load(tmp_path, doc):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_file(path), str(path)


def _bad(tmp_path, edit, match):
    doc = copy.deepcopy(GOOD)
    edit(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PublishedError, match=match) as err:
        load_file(path)
    assert str(err.value).startswith(str(path))
    return str(err.value)


def test_a_good_file_loads_and_converts(tmp_path):
    runs, _ = _load(tmp_path, GOOD)
    r = runs[0]
    assert r.measured_step_s() == pytest.approx(16 * 2048 / (1000 * 8))
    assert r.strategy().dp == 8 and r.strategy().zero == 3 and r.unknown() == ()


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["runs"][0].update(colour="red"), r"runs\[0\] \(r1\)\.colour: unknown key"),
    (lambda d: d["runs"][0].update(split="train"), r"\(r1\)\.split: 'train'; valid: fit, test"),
    (lambda d: d["runs"][0].pop("throughput"), r"runs\[0\] \(r1\): missing key 'throughput'"),
    (lambda d: d["runs"][0].update(throughput={"tflops_per_gpu": 100}), r"\.throughput\.flops: None"),
    (lambda d: d["runs"][0].update(throughput={"tokens_per_s": 1, "step_s": 2}), r"needs exactly one"),
    (lambda d: d["runs"][0]["layout"].update(recompute="sometimes"), r"\.layout\.recompute: 'sometimes'"),
    (lambda d: (d["runs"][0]["model"].update(n_heads=12, d_model=1536), d["runs"][0]["layout"].update(tp=8)),
     r"\.layout: model.n_heads=12 is not divisible by strategy.tp=8"),
    (lambda d: d["runs"][0]["layout"].update(tensor=2), r"\.layout\.tensor: unknown key"),
    (lambda d: d["runs"][0]["model"].update(d_model="big"), r"\(r1\)\.model: model.d_model='big'"),
    (lambda d: d["runs"][0].update(hardware="tpu"), r"\.hardware: 'tpu'; valid:"),
    (lambda d: d["runs"][0].update(params=7e9), r"\.params: published 7e\+09 but the model shape has"),
    (lambda d: d["runs"][0].update(memory={"gib": 80}), r"\.memory: must be"),
    (lambda d: d["runs"][0].update(gpus=0), r"\.gpus: 0 must be an integer >= 1"),
    (lambda d: d["source"].pop("url"), r"source: needs id, title and url"),
    (lambda d: d["software"].update(attention="paged"), r"software: software.attention='paged'"),
    (lambda d: d["runs"].append(copy.deepcopy(d["runs"][0])), r"duplicate run ids \['r1'\]"),
])
def test_bad_entries_fail_naming_the_file_and_field(tmp_path, edit, match):
    _bad(tmp_path, edit, match)


def test_yaml_that_is_not_a_number_is_caught(tmp_path):
    # YAML 1.1 reads 7.0e9 as a string: the check catches it rather than comparing strings
    text = yaml.safe_dump(GOOD).replace("gpus: 8", "gpus: 8e0")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PublishedError, match=r"\.gpus: '8e0' must be an integer"):
        load_file(path)


def test_the_shipped_runs_span_what_the_issue_asks():
    runs = load_published()
    assert len(runs) >= 12 and len({r.source for r in runs}) >= 4
    hardware = {r.hardware for r in runs}
    assert any(h.startswith("a100") for h in hardware) and any(h.startswith("h100") for h in hardware)
    sizes = [r.params or 0 for r in runs]
    assert min(s for s in sizes if s) < 2e9 and max(sizes) > 9e11
    assert {r.split for r in runs} == {"fit", "test"}
    assert any(r.memory_gib for r in runs if r.split == "test")


def test_megatron_flops_formula_by_hand():
    runs = {r.id: r for r in load_published()}
    r = runs["megatron-1.7b"]
    f = 96 * 512 * 2048 * 24 * 2304 ** 2 * (1 + 2048 / (6 * 2304) + 51200 / (16 * 24 * 2304))
    assert megatron_flops(r.model, 512) == pytest.approx(f)
    assert r.measured_step_s() == pytest.approx(f / (137e12 * 32))


def test_the_fit_never_reads_a_test_run():
    runs = [r for r in load_published() if r.source == "torchtitan-a100-2024"]
    one = (("families.ampere.gemm.top", 0.4, 1.0),)
    base = calibrate.fit(runs, parameters=one, sweeps=1)
    # make every held-out run absurdly slow: the fit must not move
    slowed = [dataclasses.replace(r, throughput={"step_s": 1e6}) if r.split == "test" else r for r in runs]
    assert calibrate.fit(slowed, parameters=one, sweeps=1) == base
    # while changing a fit run does move it
    faster = [dataclasses.replace(r, throughput={"step_s": r.measured_step_s() / 2}) if r.split == "fit" else r
              for r in runs]
    assert calibrate.fit(faster, parameters=one, sweeps=1) != base


def test_held_out_targets_with_the_shipped_calibration():
    result = calibrate.report(load_published(), calibration())
    test = result["test"]
    assert test["mape"] <= 0.15, test
    assert test["memory_max_error"] is not None and test["memory_max_error"] <= 0.10, test
    assert test["all_fit_memory"] and result["fit"]["all_fit_memory"]


@pytest.mark.slow
def test_the_shipped_calibration_is_this_fit():
    assert calibrate.fit(load_published()) == calibration()
