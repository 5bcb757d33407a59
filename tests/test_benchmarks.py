"""Smoke tests of the benchmarks: the runner end to end at toy sizes, and its pieces."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not part of the installed package

from benchmarks import cases, common, run, summary  # noqa: E402
from benchmarks.cases import Case  # noqa: E402
from benchmarks.shapes import OP_SHAPES, TINY_OP_SHAPES, TINY_TRAIN_SHAPES, TRAIN_SHAPES, OpShape  # noqa: E402
from helpers import compile_model_steps_cheaply, numba_imports, requires_numba  # noqa: E402


def test_tiny_run_writes_every_field(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--tiny", "--device", "cpu", "--providers", "reference,baseline",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "p50 ms" in proc.stdout and "copy bandwidth" in proc.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    for key in ("device", "torch", "triton", "commit", "python"):
        assert key in result["environment"]
    assert result["copy"]["copy_GBps"] > 0
    rows = result["rows"]
    assert {r["op"] for r in rows} == {"memory_step.fwd", "memory_step.fwd_bwd", "train_step"}
    assert {r["provider"] for r in rows if r["op"] != "train_step"} == {"reference"}  # the baseline trains only
    assert {r["provider"] for r in rows if r["op"] == "train_step"} == {"reference", "baseline"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["rel_err"] <= r["tolerance"]
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["peak_bytes"] > 0
        if r["op"] == "train_step":
            assert r["ms_per_sequence"] == pytest.approx(r["p50_ms"] / r["batch"])
        else:
            assert r["GBps"] > 0 and r["frac_copy"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--filter", "no-such-case"], "matches none of this run's 7 cases (tiny, cpu, providers reference)"),
        (["--filter", "("], "argument --filter: not a regular expression"),
        (["--filter", "tiny-copy", "--out", "{file}"], "cannot be the results folder: a file of that name is there"),
        (["--providers", ""], "--providers '' must name each provider once"),  # was every provider
        (["--providers", "reference,reference"], "must name each provider once"),  # two cases, one row
        (["--budget", "0"], "argument --budget: expected a positive number of seconds, got '0'"),  # all skipped, rc 0
        (["--budget", "nan"], "argument --budget: expected a positive number of seconds, got 'nan'"),  # no budget
    ],
    ids=["filter-matches-nothing", "filter-not-a-regex", "out-is-a-file", "providers-empty", "providers-twice",
         "budget-zero", "budget-nan"],
)
def test_runner_refuses_bad_flags_before_measuring_anything(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("")
    argv = ["--tiny", "--device", "cpu", "--providers", "reference", "--out", str(tmp_path / "out")]
    argv += [a.format(file=tmp_path / "file") for a in args]
    try:
        code = run.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_byte_model_counts_memory_three_and_six_times():
    shape = OpShape("x", B=2, N=1000, M=10, R=1, W=1, S=3)
    mem = 2 * 1000 * 10 * 4
    vectors_in = (2 * 2 * 10 + 3 * 2 * 2 + 2 * 2 * 3 + 2 * 2 * 1000 + 2 * 2 * 1 * 10) * 4
    vectors_out = (2 * 2 * 1000 + 2 * 1 * 10) * 4
    got = common.op_bytes(shape)
    assert got["fwd"] == 3 * mem + vectors_in + vectors_out
    assert got["fwd_bwd"] == 6 * mem + 3 * (vectors_in + vectors_out)


def test_a_provider_this_machine_cannot_run_is_a_skipped_row_and_a_crash_an_error(monkeypatch):
    device = torch.device("cpu")
    shape = TINY_OP_SHAPES["tiny-n16"]
    crashing = Case("memory_step.fwd", shape, "numba", device)
    monkeypatch.setattr(cases, "_op_case", lambda *args: [][0])  # a bug in a provider: it was a skipped row, rc 0
    rows = run.run_cases([Case("memory_step.fwd", shape, "triton", device), crashing], device, {"copy_GBps": 1.0},
                         time_per_case_s=0.01, min_reps=1, budget_s=10, log=lambda *_: None)
    assert rows[0]["status"] == "skipped" and "CUDA" in rows[0]["error"]
    assert rows[1]["status"] == "error" and rows[1]["error"].startswith("IndexError")


class _SlowCase(Case):
    def prepare(self):
        self.fn, self.rel_err = (lambda: time.sleep(0.2)), 0.0


def test_the_budget_counts_the_least_calls_of_the_cases_waiting_to_be_timed():
    # Each waiting case was counted at time_per_case_s, though its five least calls take a second here: a quick
    # run under load ran past its 90 s, and never reached its compiled row.
    cpu = torch.device("cpu")
    slow = [_SlowCase("memory_step.fwd", TINY_OP_SHAPES["tiny-n16"], provider, cpu) for provider in ("a", "b")]
    rows = run.run_cases(slow, cpu, {"copy_GBps": 1.0}, time_per_case_s=0.01, min_reps=5, budget_s=2.0,
                         log=lambda *_: None)
    assert [r["status"] for r in rows] == ["ok", "skipped"] and "time budget spent" in rows[1]["error"]
    assert rows[0]["reps"] >= 5


def test_the_compiled_reference_training_step_runs_a_compiled_graph(monkeypatch):
    """``reference-compile``'s training step runs the model through torch.compile (here with dynamo's ``eager``, not
    Inductor's seconds of C++), checked against the float64 model; a compile that compiles nothing (as
    ``model.cell.compile()`` did: the steps never call the cell's forward) is an error, not an eager time."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    case = Case("train_step", TINY_TRAIN_SHAPES["tiny-copy"], "reference-compile", torch.device("cpu"))
    case.prepare()
    assert case.rel_err < 1e-5
    case.fn()
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    with pytest.raises(RuntimeError, match="no compiled graph ran"):
        Case("train_step", TINY_TRAIN_SHAPES["tiny-copy"], "reference-compile", torch.device("cpu")).prepare()


def test_the_compiled_graph_provider_captures_the_compiled_model(monkeypatch):
    """``reference-compile-graph`` hands ``CapturedStep`` the model under torch.compile, checks that its first
    (eager) step ran a compiled graph, and compares the replay with the float64 model. CUDA graphs need a GPU, so
    here ``CapturedStep`` is a stand-in that runs each step eagerly, with plain SGD for capturable Adam (CUDA's):
    the parameters move at every step, so a check against the float64 model at other parameters would fail."""
    from fastntm import graphs

    given = []

    class EagerStep:
        def __init__(self, model, optimizer, loss_fn):
            given.append(model)
            self.model, self.loss_fn = model, loss_fn

        def __call__(self, *tensors):
            self.model.zero_grad(set_to_none=True)
            out = self.loss_fn(self.model, *tensors)
            out[0].backward()
            with torch.no_grad():
                for p in self.model.parameters():
                    p -= 0.1 * p.grad
            return out

    monkeypatch.setattr(graphs, "CapturedStep", EagerStep)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    shape, cpu = TINY_TRAIN_SHAPES["tiny-copy"], torch.device("cpu")
    fn, rel_err = cases._train_case(shape, "reference-compile-graph", cpu)
    assert isinstance(given[0], torch._dynamo.eval_frame.OptimizedModule)
    assert rel_err < 1e-5
    assert torch.isfinite(fn())
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    with pytest.raises(RuntimeError, match="reference-compile-graph: no compiled graph ran"):
        cases._train_case(shape, "reference-compile-graph", cpu)


def test_a_wrong_provider_gets_no_speed_figure(monkeypatch):
    device = torch.device("cpu")
    case = Case("memory_step.fwd", TINY_OP_SHAPES["tiny-n16"], "reference", device)

    def prepare():
        case.fn, case.rel_err = (lambda: None), 0.5

    monkeypatch.setattr(case, "prepare", prepare)
    rows = run.run_cases([case], device, {"copy_GBps": 1.0}, time_per_case_s=0.01, min_reps=1, budget_s=10,
                         log=lambda *_: None)
    assert rows[0]["status"] == "MISMATCH" and "p50_ms" not in rows[0]


def test_a_compile_cut_short_keeps_every_row_timed_before_it(monkeypatch):
    """The uncompiled cases are timed and saved before any compile starts, and each compiled case as soon as it
    is warm: a compile stopped by an outer timeout (here an exception that is not an Exception, as the signal's
    would be) loses only its own row and those after it, which say ``pending``."""
    device = torch.device("cpu")
    shape = TINY_OP_SHAPES["tiny-n16"]
    plain = Case("memory_step.fwd", shape, "reference", device)
    compiled = Case("memory_step.fwd", shape, "reference-compile", device)
    cut = Case("memory_step.fwd_bwd", shape, "reference-compile", device)
    after = Case("memory_step.fwd_bwd", TINY_OP_SHAPES["sweep-n32"], "reference-compile", device)

    def ready(case):
        def prepare():
            case.fn, case.rel_err = (lambda: None), 0.0
        return prepare

    def interrupted():
        raise KeyboardInterrupt

    for case, prepare in ((plain, ready(plain)), (compiled, ready(compiled)), (cut, interrupted)):
        monkeypatch.setattr(case, "prepare", prepare)
    saved = []
    with pytest.raises(KeyboardInterrupt):  # the compiles' budget (40 s on a CPU) is there: they start
        run.run_cases([compiled, cut, after, plain], device, {"copy_GBps": 1.0}, time_per_case_s=0.01, min_reps=1,
                      budget_s=100, on_row=lambda rows: saved.append({r["name"]: r["status"] for r in rows}),
                      log=lambda *_: None)
    assert saved[-1] == {compiled.name: "ok", cut.name: "pending", after.name: "pending", plain.name: "ok"}


def test_a_budget_cuts_the_compiled_rows_first_and_the_compiled_graph_last_of_them():
    cuda = torch.device("cuda")
    providers = cases.providers_for(cuda) + cases.train_only_providers_for(cuda)
    names = [c.provider for c in run.build_cases(cuda, "quick", providers, "train_step/copy-b32/")]
    assert names[-2:] == ["reference-compile-graph", "reference-compile"]
    assert {"reference", "triton", "triton-graph", "reference-graph"} == set(names[:-2])


def test_only_a_whole_model_compile_reserves_minutes_of_the_budget():
    cpu = torch.device("cpu")
    for shape in (TRAIN_SHAPES["copy-b32"], TINY_TRAIN_SHAPES["tiny-copy"]):
        assert run._compile_reserve_s(Case("train_step", shape, "reference-compile", cpu)) == 300
    for provider in ("reference-compile", "reference-compile-graph"):
        assert run._compile_reserve_s(Case("train_step", TRAIN_SHAPES["copy-b32"], provider,
                                           torch.device("cuda"))) == 120
    for case in (Case("train_step", TRAIN_SHAPES["copy-b32"], "compiled", cpu),  # the memory step alone
                 Case("memory_step.fwd_bwd", OP_SHAPES["paper-b32"], "reference-compile", cpu)):
        assert run._compile_reserve_s(case) == run.COMPILE_RESERVE_S["cpu"], case.name
    assert run._compile_reserve_s(Case("train_step", TRAIN_SHAPES["copy-b32"], "numba", cpu)) == 0


def test_quantiles_are_ordered():
    t = common.time_call(lambda: sum(range(1000)), torch.device("cpu"), budget_s=0.01, min_reps=7)
    assert t["reps"] >= 7 and t["p20_ms"] <= t["p50_ms"] <= t["p80_ms"]


def test_cpu_peak_memory_sees_a_tensor_made_in_the_call():
    peak = common.peak_memory(lambda: torch.empty(2**20, dtype=torch.float32).fill_(1), torch.device("cpu"))
    assert peak["peak_bytes"] >= 4 * 2**20


def test_cpu_peak_memory_counts_one_call_not_what_earlier_calls_left_alive():
    # The profiler's running total carried every tensor a profiled call kept (4, 8, 12 MiB over three calls),
    # so each row of a run took the leftovers of the rows before it.
    kept = []

    def keep_4mib_and_free_1mib():
        kept.append(torch.ones(2**20))
        torch.ones(2**18)

    cpu = torch.device("cpu")
    peaks = [common.peak_memory(keep_4mib_and_free_1mib, cpu)["peak_bytes"] for _ in range(3)]
    assert peaks[0] == peaks[1] == peaks[2] and 4 * 2**20 <= peaks[0] < 6 * 2**20
    assert common.peak_memory(lambda: torch.ones(2**18), cpu)["peak_bytes"] < 2 * 2**20


def test_long_sequence_ratios_pair_the_right_rows():
    from benchmarks import long_sequence

    base = dict(B=1, N=8, M=2, R=1, W=1, T=5, device="cpu", steps_timed=1)
    rows = []
    for dtype, every, peak, step in (("float32", "auto", 10, 3.0), ("float32", 0, 100, 2.0),
                                     ("bfloat16", "auto", 6, 3.0)):
        config = dict(base, memory_dtype=dtype, checkpoint_every=every)
        rows.append(dict(config=config, label=long_sequence.label(config), peak_bytes=peak, step_s=step))
    ratios = long_sequence.ratios(rows)
    auto32 = long_sequence.label(dict(base, memory_dtype="float32", checkpoint_every="auto"))
    auto16 = long_sequence.label(dict(base, memory_dtype="bfloat16", checkpoint_every="auto"))
    assert ratios[f"{auto32} vs store-all"] == {"peak": 0.1, "time": 1.5}
    assert ratios[f"{auto16} vs float32"] == {"peak": 0.6, "time": 1.0}
    assert len(ratios) == 2


def test_summary_gives_each_fast_provider_its_speedup_over_the_eager_reference(tmp_path):
    rows = [
        dict(name=f"train_step/copy-b32/{provider}", op="train_step", shape="copy-b32", provider=provider, status="ok",
             p50_ms=ms, p20_ms=ms, p80_ms=ms, ms_per_sequence=ms / 32, peak_bytes=0)
        for provider, ms in (("reference", 66.0), ("triton", 50.0), ("triton-graph", 3.0),
                             ("reference-compile", 40.0), ("reference-compile-graph", 4.5))
    ]
    results = dict(environment=dict(device="GPU", torch="2.11", triton="3.6.0", commit="abc"),
                   copy=dict(copy_GBps=4000.0), rows=rows)
    (tmp_path / "results.json").write_text(json.dumps(results))
    lines = summary.summarise(str(tmp_path))
    assert "  speedup triton vs reference (eager) train_step/copy-b32: 1.3x" in lines
    assert "  speedup triton-graph vs reference (eager) train_step/copy-b32: 22.0x" in lines
    # and each against torch.compile launched alike: eagerly, or from one CUDA graph
    assert "  speedup triton vs reference-compile train_step/copy-b32: 0.80x" in lines
    assert "  speedup triton-graph vs reference-compile-graph train_step/copy-b32: 1.50x" in lines


def test_summary_gives_the_kernels_fraction_of_copy_bandwidth_for_each_timing_it_has(tmp_path):
    row = dict(correct=True, triton_fwd_frac_copy=0.65, triton_fwd_bwd_frac_copy=0.34, triton_fwd_graph_frac_copy=0.7)
    (tmp_path / "bench_kernels.json").write_text(json.dumps(dict(shapes=dict(large=row))))
    lines = summary.summarise(str(tmp_path))
    assert "  bench_kernels large: triton, byte model over copy bandwidth: fwd 65%, fwd_bwd 34%, fwd_graph 70%" in lines


def test_kernel_profile_on_cpu_writes_rows_with_positive_times(tmp_path, capsys):
    from benchmarks import kernel_profile

    assert kernel_profile.main(["--device", "cpu", "--shapes", "tiny-n16", "--iters", "2", "--warmup", "1",
                                "--out", str(tmp_path)]) == 0
    assert "CPU ops" in capsys.readouterr().out
    result = json.loads((tmp_path / "kernel_profile.json").read_text())
    assert result["environment"]["torch"] and "CPU ops" in result["events"]
    profiles = result["profiles"]
    assert [(p["shape"], p["op"], p["events"]) for p in profiles] == [("tiny-n16", "fwd", "cpu"),
                                                                       ("tiny-n16", "fwd_bwd", "cpu")]
    for p in profiles:
        assert p["rows"] and p["summed_us_per_iter"] > 0
        assert all(r["total_us_per_iter"] >= 0 and r["calls_per_iter"] > 0 for r in p["rows"])
        assert sum(r["total_us_per_iter"] for r in p["rows"]) > 0
        assert sum(r["share"] for r in p["rows"]) == pytest.approx(1.0)


def test_kernel_profile_aggregates_device_events_and_their_bandwidth():
    """The CUDA branch on fake events (no GPU here): device events only, by name, with the byte model."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    from benchmarks import kernel_profile

    def event(name, start, end, device_type=DeviceType.CUDA, kernels=()):
        return SimpleNamespace(name=name, time_range=Interval(start, end), device_type=device_type, is_async=False,
                               is_user_annotation=False, self_cpu_time_total=end - start, kernels=list(kernels))

    launch = SimpleNamespace(name="void at::native::reduce_kernel<512>", device=0, duration=10)
    events = [event("aten::amax", 0, 50, DeviceType.CPU, [launch]),
              event("_similarity_kernel", 100, 200), event("void at::native::reduce_kernel<512>", 200, 210),
              event("_similarity_kernel", 300, 400), event("void at::native::reduce_kernel<512>", 400, 410)]
    launched = kernel_profile.launchers(events)
    rows, totals = kernel_profile.aggregate(kernel_profile.samples(events, "cuda"), 2, launched)
    assert [r["name"] for r in rows] == ["_similarity_kernel", "void at::native::reduce_kernel<512>"]
    assert rows[0]["calls_per_iter"] == 1 and rows[0]["total_us_per_iter"] == 100 and rows[0]["mean_us"] == 100
    assert rows[0]["share"] == pytest.approx(200 / 220) and rows[1]["launched_by"] == ["aten::amax"]
    assert totals == {"summed_us_per_iter": 110, "span_us_per_iter": 155}
    shape = OpShape("x", B=2, N=1000, M=10, R=1, W=1)
    kernel_profile.add_bandwidth(rows, shape, copy_GBps=2.0)
    assert rows[0]["model_bytes"] == 2 * 1000 * 10 * 4 + 2 * 2 * 1000 * 4  # mem once, the logits K once
    assert rows[0]["GBps"] == pytest.approx(rows[0]["model_bytes"] / 100e-6 / 1e9)
    assert rows[0]["frac_copy"] == pytest.approx(rows[0]["GBps"] / 2.0) and "GBps" not in rows[1]
    assert "_similarity_kernel" in "\n".join(kernel_profile.format_table(
        dict(shape="x", op="fwd", backend="triton", events="cuda", iters=2, rows=rows, **totals)))


def skip_without_the_interpreter(what: str) -> None:
    """Skip where the Triton path cannot take CPU tensors: conftest.py sets TRITON_INTERPRET=1 without a GPU, and
    a run that switches it off (the static checks' way) has no kernels to run here."""
    from fastntm import kernels

    if not getattr(kernels, "INTERPRETING", False):
        pytest.skip(f"{what} on CPU tensors: needs TRITON_INTERPRET=1 before fastntm is imported")


def test_launch_count_sees_the_head_parameters_as_one_op_each_way_on_the_triton_path():
    skip_without_the_interpreter("counts the Triton path")
    from benchmarks import launch_count

    result = launch_count.run(batch=2, lengths=(1, 2))
    triton, reference = result["backends"]["triton"], result["backends"]["reference"]
    for op in ("head_parameters", "memory_step"):
        assert triton["forward"]["by_op"][f"fastntm.{op}_fwd"] == 1
        assert triton["backward"]["by_op"][f"fastntm.{op}_bwd"] == 1
    assert "aten.softplus" in reference["forward"]["by_op"] and "aten.softplus" not in triton["forward"]["by_op"]
    for rows in result["backends"].values():
        for row in rows.values():
            # fixed: the output layer and the loss, less the last step's skipped work; it may be negative.
            assert row["per_time_step"] == sum(row["by_op"].values()) > 0 and row["fixed"] == int(row["fixed"])
    assert "per time step" in launch_count.report(result)


def test_large_memory_step_launches_stay_few():
    # Each launch costs a few microseconds whatever its size: on the GPU between kernels under a CUDA graph,
    # and on the host in a plain call. Torch's ops are the block-partial sums a later pass or an output needs.
    from benchmarks import launch_count

    result = launch_count.count_memory_step("medium")
    assert result["forward"]["triton"] == {"_similarity_kernel": 1, "_softmax_merge_kernel": 1,
                                           "_shift_sharpen_kernel": 1, "_read_write_kernel": 1,
                                           "_sum_blocks_kernel": 1}
    assert result["forward"]["torch"] == {"aten.sum": 1}
    backward = result["backward"]["triton"]
    assert sum(backward.values()) == 9 and backward["_head_grads_kernel"] == 1 and backward["_sum_blocks_kernel"] == 3
    assert result["backward"]["torch"] == {"aten.sum": 1}
    assert "_head_grads_kernel" in launch_count.report_memory_step("medium", result)


def test_block_sums_benchmark_checks_every_provider_before_timing():
    skip_without_the_interpreter("runs _sum_blocks_kernel")
    from benchmarks import bench_block_sums

    rows = bench_block_sums.measure((2, 37, 20), torch.device("cpu"), bench_block_sums.CONFIGS[:2], 10.0)
    # Labelled with the rows a load takes: 37 blocks cap both configurations' loads at 64 rows.
    assert [r["provider"] for r in rows] == ["torch", "kernel r64 w8", "kernel r64 w4"]
    assert all(r["rel_err"] <= 1e-6 and r["cold"]["p50_us"] > 0 and r["cold"]["frac_copy"] == r["cold"]["GBps"] / 10
               for r in rows)
    assert "kernel r64 w8" in bench_block_sums.format_row(rows[1])
    assert "MISMATCH" in bench_block_sums.format_row({"provider": "x", "rel_err": 1.0})
    assert set(bench_block_sums.partials(OP_SHAPES["large"])) == {"reads", "de+da", "sharpen", "dk"}


def test_bench_kernels_speedups_pair_timings_that_both_providers_have():
    from benchmarks import bench_kernels

    def timing(p50):
        return {"p50_us": p50, "p20_us": p50, "p80_us": p50}

    row = {"triton": {"fwd": timing(10.0), "fwd_bwd": timing(40.0), "fwd_graph": timing(5.0),
                      "fwd_bwd_graph": timing(20.0)},
           "reference": {"fwd": timing(50.0), "fwd_bwd": timing(200.0), "fwd_graph": timing(30.0),
                         "fwd_bwd_graph": timing(160.0)},
           "reference-literal": {"fwd": timing(100.0), "fwd_bwd": timing(400.0), "fwd_graph": timing(60.0),
                                 "fwd_bwd_graph": {"error": "AcceleratorError: capture failed"}}}
    assert bench_kernels.speedups(row) == {
        "reference": {"fwd": 5.0, "fwd_bwd": 5.0, "fwd_graph": 6.0, "fwd_bwd_graph": 8.0},
        "reference-literal": {"fwd": 10.0, "fwd_bwd": 10.0, "fwd_graph": 12.0},
    }


def test_compare_trees_times_both_trees_in_alternating_rounds():
    from benchmarks import compare_trees

    r = compare_trees.compare(str(ROOT), str(ROOT), "tiny-copy", rounds=2, steps=1, backend="reference", threads=1)
    assert len(r["p50_ms"]["old"]) == len(r["p50_ms"]["new"]) == 2
    assert all(t > 0 for t in r["p50_ms"]["old"] + r["p50_ms"]["new"])
    assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]


def test_compare_trees_times_the_cpus_default_backend_unless_told(monkeypatch, capsys):
    from benchmarks import compare_trees, versus_baseline

    asked = []

    def compare(old, new, shape, rounds, steps, backend, threads):
        asked.append((backend, threads))
        return dict(shape=shape, backend=backend, threads=threads, rounds=rounds, steps=steps, old_median_ms=1.0,
                    new_median_ms=1.0, ratio_median=1.0, ratio_min=1.0, ratio_max=1.0)

    monkeypatch.setattr(compare_trees, "compare", compare)
    assert compare_trees.main([str(ROOT), str(ROOT)]) == 0
    assert compare_trees.main([str(ROOT), str(ROOT), "--backend", "reference", "--threads", "2"]) == 0
    assert asked == [(versus_baseline.default_backend(), 1), ("reference", 2)]
    out = capsys.readouterr().out
    assert f"({versus_baseline.default_backend()}, 1 thread)" in out and "(reference, 2 threads)" in out


def test_compare_trees_refuses_trees_whose_models_run_different_backends(monkeypatch):
    """A tree from before the numba kernels names "numba" "reference" (its ``cases._backend``): timed beside a newer
    tree's numba step, the ratio would compare two backends without a word."""
    from benchmarks import cases, compare_trees, versus_baseline

    default = versus_baseline.default_backend()  # numba where it imports
    assert compare_trees._resolved_backend(default) == default
    monkeypatch.setattr(cases, "_backend", lambda provider: "reference")
    assert compare_trees._resolved_backend("numba") == "reference"
    compare_trees._check_same_backend({"old": "numba", "new": "numba"}, "numba")
    with pytest.raises(RuntimeError, match="the old tree's model runs 'reference', the new tree's 'numba'"):
        compare_trees._check_same_backend({"old": "reference", "new": "numba"}, "numba")


def test_baseline_memory_step_is_the_spec_with_its_shift_mirrored():
    """The baseline (a model of the NTM code in common use) does the same work as fastntm: SPEC.md's step,
    its shift taps in the other order."""
    from benchmarks import baseline_ntm
    from fastntm import reference

    gen = torch.Generator().manual_seed(3)
    B, N, M = 3, 17, 5

    def rand(*size):
        return torch.rand(*size, generator=gen, dtype=torch.float64)

    mem = torch.randn(B, N, M, generator=gen, dtype=torch.float64)
    heads = [[torch.randn(B, M, generator=gen, dtype=torch.float64), rand(B, 1) * 5, rand(B, 1),
              torch.softmax(rand(B, 3) * 4, -1), 1 + rand(B, 1) * 3, torch.softmax(rand(B, N) * 4, -1)]
             for _ in range(2)]
    e, a = rand(B, M), torch.randn(B, M, generator=gen, dtype=torch.float64)
    w_read, w_write, r, new_mem = baseline_ntm.memory_step(mem, heads[0], [*heads[1], e, a])

    k, beta, g, s, gamma, w_prev = (torch.stack(pair, dim=1) for pair in zip(*heads))
    w_ref, r_ref, mem_ref = reference.memory_step(mem, k, beta[..., 0], g[..., 0], s.flip(-1), gamma[..., 0], w_prev,
                                                  e[:, None], a[:, None], 1)
    for out, ref in ((w_read, w_ref[:, 0]), (w_write, w_ref[:, 1]), (r, r_ref[:, 0]), (new_mem, mem_ref)):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@requires_numba
def test_versus_baseline_alternates_its_rounds_and_pairs_their_ratios(monkeypatch):
    """fastntm on its default backend (numba on a CPU) and on the reference path, and the baseline, in ABC CBA
    order; the top-level ratios are the default backend's. (Cases stand in for the real ones, whose checks
    the tests below run.)"""
    from benchmarks import versus_baseline

    def prepare(case):
        case.fn, case.rel_err = (lambda: None), 0.0

    monkeypatch.setattr(versus_baseline.Case, "prepare", prepare)
    calls = []

    def fake_p50_ms(fn, steps):  # by first appearance: fastntm (numba) 10 ms, fastntm (reference) 20, baseline 30
        calls.append(fn)
        return 10.0 * (calls.index(fn) + 1)

    monkeypatch.setattr(versus_baseline, "p50_ms", fake_p50_ms)
    monkeypatch.setitem(versus_baseline.TARGETS, "tiny-copy", 2.5)
    r = versus_baseline.compare(TINY_TRAIN_SHAPES["tiny-copy"], rounds=3, steps=1, log=lambda line: None)
    default, reference, baseline = calls[:3]
    assert calls == [default, reference, baseline, baseline, reference, default, default, reference, baseline]
    assert r["backend"] == "numba"
    assert r["p50_ms"] == {"numba": [10.0] * 3, "reference": [20.0] * 3, "baseline": [30.0] * 3}
    assert r["speedups"] == [3.0] * 3 and r["speedup_median"] == 3.0  # baseline / fastntm
    assert r["target"] == 2.5 and r["rounds_meeting_target"] == 3
    assert r["reference"]["median_ms"] == 20.0
    assert r["reference"]["baseline_over_reference"]["median"] == 1.5
    assert r["reference"]["baseline_over_reference"]["rounds_meeting_target"] == 0
    assert r["reference"]["default_over_reference"]["median"] == 0.5


@requires_numba
def test_versus_baseline_pairs_the_compiled_step_with_the_others_in_the_same_rounds(monkeypatch):
    """``compiled=True``: fastntm with backend='compiled' checked and timed beside the eager steps and the baseline
    (its step compiled by ``aot_eager`` here: Inductor's graphs are tests/test_compiled.py's)."""
    from benchmarks import versus_baseline

    graphs = compile_model_steps_cheaply(monkeypatch)

    order = []

    def fake_p50_ms(fn, steps):  # by first appearance: numba 10 ms, reference 20, compiled 5, baseline 30
        if fn not in order:
            order.append(fn)
        return (10.0, 20.0, 5.0, 30.0)[order.index(fn)]

    monkeypatch.setattr(versus_baseline, "p50_ms", fake_p50_ms)
    monkeypatch.setitem(versus_baseline.TARGETS, "tiny-copy", 4.0)
    r = versus_baseline.compare(TINY_TRAIN_SHAPES["tiny-copy"], rounds=2, steps=1, compiled=True, log=lambda line: None)
    assert set(r["rel_err"]) == {"numba", "reference", "compiled", "baseline"}
    assert all(err <= common.TOLERANCE[torch.float32] for err in r["rel_err"].values())
    assert r["p50_ms"] == {"numba": [10.0] * 2, "reference": [20.0] * 2, "compiled": [5.0] * 2,
                           "baseline": [30.0] * 2}
    assert r["speedup_median"] == 3.0 and r["rounds_meeting_target"] == 0  # baseline / the default backend
    compiled = r["compiled"]
    assert compiled["median_ms"] == 5.0
    assert compiled["baseline_over_compiled"]["median"] == 6.0
    assert compiled["baseline_over_compiled"]["rounds_meeting_target"] == 2
    assert compiled["compiled_over_default"]["median"] == 0.5
    assert graphs  # the compiled provider's step ran compiled


def test_versus_baseline_checks_both_steps_then_times_them_in_alternating_rounds(tmp_path, capsys):
    from benchmarks import versus_baseline

    assert versus_baseline.main(["--shapes", "tiny-copy", "--rounds", "2", "--steps", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "versus_baseline.json").read_text())
    (r,) = result["shapes"]
    default = r["backend"]  # numba where it imports
    assert r["shape"] == "tiny-copy" and set(r["rel_err"]) == {default, "reference", "baseline"}
    assert all(err <= common.TOLERANCE[torch.float32] for err in r["rel_err"].values())
    assert len(r["p50_ms"][default]) == len(r["p50_ms"]["baseline"]) == len(r["speedups"]) == 2
    assert r["speedup_min"] <= r["speedup_median"] <= r["speedup_max"]
    assert r["target"] is None and r["rounds_meeting_target"] is None  # the targets are for copy-b1 and copy-b32
    assert "baseline / fastntm paired" in capsys.readouterr().out
    assert versus_baseline.TARGETS == {"copy-b1": 2.0, "copy-b32": 8.0}


def test_versus_baseline_times_a_pytorch_ntm_clone_in_the_same_rounds(tmp_path, monkeypatch):
    """--pytorch-ntm imports ntm.aio.EncapsulatedNTM from a clone; here a stand-in with its interface."""
    from benchmarks import versus_baseline

    (tmp_path / "clone" / "ntm").mkdir(parents=True)
    (tmp_path / "clone" / "ntm" / "__init__.py").write_text("")
    (tmp_path / "clone" / "ntm" / "aio.py").write_text(
        "import torch\n"
        "class EncapsulatedNTM(torch.nn.Module):\n"
        "    def __init__(self, num_inputs, num_outputs, controller_size, controller_layers, num_heads, N, M):\n"
        "        super().__init__()\n"
        "        self.num_inputs, self.fc = num_inputs, torch.nn.Linear(num_inputs, num_outputs)\n"
        "    def init_sequence(self, batch_size):\n"
        "        self.batch_size = batch_size\n"
        "    def forward(self, x=None):\n"
        "        x = torch.zeros(self.batch_size, self.num_inputs) if x is None else x\n"
        "        return torch.sigmoid(self.fc(x)), None\n")
    for name in ("ntm", "ntm.aio"):  # set, then removed: undoing both leaves sys.modules as it was
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    r = versus_baseline.compare(TINY_TRAIN_SHAPES["tiny-copy"], rounds=2, steps=1,
                                pytorch_ntm=str(tmp_path / "clone"), log=lambda line: None)
    assert len(r["p50_ms"]["pytorch-ntm"]) == len(r["p50_ms"]["reference"]) == 2
    assert r["pytorch_ntm_speedup_min"] <= r["pytorch_ntm_speedup_median"] <= r["pytorch_ntm_speedup_max"]
    assert r["pytorch_ntm_over_baseline_median"] > 0
    with pytest.raises(SystemExit):
        versus_baseline.main(["--pytorch-ntm", str(tmp_path), "--out", str(tmp_path / "out")])  # no ntm/aio.py


@pytest.mark.parametrize("args, message", [(["--shapes", "copy-b1,nope"], "nope not among"),
                                           (["--steps", "0"], "--rounds and --steps must be positive")],
                         ids=["shape", "steps"])
def test_versus_baseline_refuses_bad_flags_before_building_anything(tmp_path, capsys, args, message):
    from benchmarks import versus_baseline

    with pytest.raises(SystemExit) as exc:
        versus_baseline.main([*args, "--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}", "{root}"], "is not a fastntm source tree"),
        (["{root}/README.md", "{root}"], "is not a fastntm source tree"),
        (["{root}", "{root}", "--shape", "nope"], "--shape 'nope' is not one of"),
        (["{root}", "{root}", "--rounds", "0"], "must be positive, got 0, 5 and 1"),
        (["{root}", "{root}", "--threads", "0"], "must be positive, got 16, 5 and 0"),
        (["{root}", "{root}", "--backend", "nope"], "invalid choice: 'nope'"),
    ],
    ids=["empty-folder", "a-file", "shape", "rounds", "threads", "backend"],
)
def test_compare_trees_refuses_what_it_cannot_time_before_starting_workers(tmp_path, capsys, args, message):
    from benchmarks import compare_trees

    with pytest.raises(SystemExit) as exc:
        compare_trees.main([a.format(tmp=tmp_path, root=ROOT) for a in args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_summary_has_help_and_refuses_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        summary.main(["--help"])
    assert exc.value.code == 0 and "usage: python -m benchmarks.summary" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        summary.main([str(tmp_path / "missing")])
    assert exc.value.code == 2 and "is not a folder" in capsys.readouterr().err


def test_sass_model_gives_each_loop_of_the_large_step_its_trip_count(tmp_path):
    # Compiling needs the interpreter off, so in a process of its own.
    out = tmp_path / "sass.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sass_model", "--shape", "large", "--json", str(out)],
                          cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    counts = {c["name"]: c for c in data["fwd"] + data["bwd"]}
    H, R, S = data["shape"]["R"] + data["shape"]["W"], data["shape"]["R"], data["shape"]["S"]
    # The loops over heads and over shift taps, found in the SASS and matched to their for statements. The
    # similarity pass takes its heads in one tensor-core product (H <= 8): straight code.
    assert counts["_similarity_kernel"]["loops"] == []
    assert [trips for _, trips in counts["_read_write_kernel"]["loops"]] == [R]
    # The shift's taps: two loops of K trips (K = (S - 1) / 2 = 1, a constant to Triton: straight code).
    assert S == 3 and counts["_shift_sharpen_kernel"]["loops"] == []
    assert H in [trips for _, trips in counts["_mem_bwd_kernel"]["loops"]]
    # A range with a step: 65,536 / 64 = 1,024 block partials a head, 1,024 a trip, so one trip (it once
    # counted the range's length, which would be 1,024 here).
    assert [trips for _, trips in counts["_softmax_merge_kernel"]["loops"]] == [1]
    for c in counts.values():
        assert all(trips is not None for _, trips in c["loops"]), c
        if len(c["loops"]) == 1:  # the loop's body once a trip, the rest once
            (size, trips), = c["loops"]
            assert c["per_warp"] == c["static"] + (trips - 1) * size
        assert c["total"] == c["per_warp"] * c["warps"] * c["programs"]
    assert "fwd_bwd" in proc.stdout and "a memory row" in proc.stdout


def test_summary_turns_the_sass_model_and_measured_times_into_instructions_a_clock():
    from benchmarks.sass_model import CLOCK_GHZ, SMS

    model = {"shape": {"name": "large"}, "fwd": [{"total": 3 * 10**8}, {"total": 10**8}], "bwd": [{"total": 4 * 10**8}]}
    us = 4e8 / (2 * SMS * CLOCK_GHZ * 1e3)  # two a clock an SM
    kernels = {"shapes": {"large": {"triton": {"fwd": {"p50_us": us}}}}}
    fwd, both = summary.issue_lines(model, kernels)
    assert fwd.startswith("  sass_model large fwd: 400 M warp-instructions") and "2.00 a clock an SM" in fwd
    assert both == "  sass_model large fwd_bwd: 800 M warp-instructions"  # no time for it


def test_sass_model_counts_a_helper_inlined_at_two_places_in_full():
    # The on-chip forward inlines the addressing (a loop over the S shift taps) in a read head's program
    # and in the write heads' loop over W heads; the backward's per-head kernel loops over the W write heads
    # and twice over the taps, its dL/dmem kernel once over the H heads. R != W != S here, so a loop given the
    # wrong statement shows.
    script = (
        "import torch\n"
        "from benchmarks import sass_model\n"
        "from benchmarks.shapes import OpShape\n"
        "counts = sass_model.model(OpShape('x', B=1, N=128, M=20, R=3, W=2, S=5), torch.float32, 90)\n"
        "print({c.name: sorted(t for _, t in c.loops) for c in counts['fwd'] + counts['bwd']})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trips = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    # Forward: the shift's loop at each of the two call sites of _onchip_address (a read head's program,
    # the write heads' program), the write heads' loop. ptxas unrolls a tap loop whose body is small (both
    # of the forward's, the backward's recompute of the shift): a copy of several taps, given no trips, and
    # a remainder loop of one tap, given every trip (see the sass_model docstring).
    assert trips["_memory_step_onchip_kernel"] == [0, 0, 2, 5, 5]
    assert trips["_onchip_heads_bwd_kernel"] == [0, 2, 5, 5]
    assert trips["_onchip_mem_bwd_kernel"] == [5]


def test_importing_a_benchmark_module_leaves_the_interpreter_setting_alone():
    # A module that set TRITON_INTERPRET on import made every kernel defined after it run in the
    # interpreter: on a GPU, `pytest -m gpu` timed the interpreter, and failed under numpy 2.4+.
    modules = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
    script = ("import importlib, os\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module('benchmarks.' + name)\n"
              "    assert 'TRITON_INTERPRET' not in os.environ, name\n"
              "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok"


def test_launch_cost_times_each_kernel_launch_of_a_call_and_unwraps():
    # Under the interpreter (conftest) the kernels run on CPU tensors; what is checked is the wrapping: every
    # launch of a large-memory forward is counted under its kernel's name, and undo restores the kernels.
    import importlib

    from benchmarks import launch_cost
    from benchmarks.shapes import OpShape
    from fastntm.kernels import _config

    step = importlib.import_module("fastntm.kernels.memory_step")
    shape = OpShape("launches", B=1, N=37, M=13, R=1, W=1)
    x = common.op_inputs(shape, torch.device("cpu"))
    with _config.force(block_n=16):
        expected = step._forward(*x, shape.R, True)
        spent, undo = launch_cost._timed_runs(step)
        try:
            got = step._forward(*x, shape.R, True)
        finally:
            undo()
    assert sorted(spent) == ["_read_write_kernel", "_shift_sharpen_kernel", "_similarity_kernel",
                             "_softmax_merge_kernel", "_sum_blocks_kernel"]
    assert all(len(v) == 1 and v[0] > 0 for v in spent.values())
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert "run" not in vars(step._similarity_kernel)


def test_tf32_three_times_over_keeps_the_cosine_within_a_few_fp32_roundings():
    from benchmarks import tf32_error

    for width in (8, 64):
        result = tf32_error.errors(rows=2000, width=width)
        for case in result.values():
            fp32, kernel = case["fp32 multiply-add"], case["tf32 x3 (the kernel)"]
            # A few fp32 roundings of the cosine, like the multiply-adds: not tf32's 2^-11 (4.9e-4).
            assert kernel["max"] < 1e-6 and fp32["max"] < 1e-6, case
            assert kernel["mean"] < case["tf32 x3, both cut"]["mean"], (width, case)
        # Near the key the terms agree in sign, and where both operands' x_hi is cut (stop 23 to 25) what the
        # products leave out leans one way: 3x (M 64) to 10x (M 8) fp32's mean error. The kernels round the
        # keys' x_hi (the memory tile's, rounded, cost registers): half that.
        near = result["near the key"]
        assert near["tf32 x3 (the kernel)"]["mean"] < 0.6 * near["tf32 x3, both cut"]["mean"], (width, near)


def test_sharp_focus_study_finds_the_kernels_rounding_like_the_fp32_reference(tmp_path, capsys):
    # The study end to end: a step focused on single slots (beta 300, g 1), three draws, both regimes. Three
    # draws only bound gross losses: one draw's fp32 reference can miss 10x less than the next draw's (here
    # dL/dbeta, 7.7e-6 in one draw, where 1-ulp moves of its inputs give a median of 3.7e-5). A cancellation
    # taken in the wrong order (d81ba13, reverted at stop 25) put dL/dbeta hundreds of times past it.
    from benchmarks import sharp_focus

    sharp_focus.main(["--shape", "2,11,6,1,1,3", "--beta", "300", "--g", "1", "--seeds", "3",
                      "--json", str(tmp_path / "sharp.json")])
    assert "on-chip:" in capsys.readouterr().out
    result = json.loads((tmp_path / "sharp.json").read_text())
    assert sorted(result["regimes"]) == ["large", "on-chip"]
    for regime, rows in result["regimes"].items():
        assert {"w", "r", "new_mem", "mem", "k", "beta", "gamma", "e", "a"} <= set(rows), regime
        assert "w_prev" not in rows  # its gradient is 0 at g = 1
        for name, row in rows.items():
            assert 0 < row["median_error"] < 1e-3 and row["summed_ratio"] < 50, (regime, name, row)


@pytest.mark.parametrize("args, message", [
    (["--shape", "2,11,6"], "six integers"), (["--shape", "2,11,6,1,1,4"], "S odd"),
    (["--shape", "2,11,200,1,1,3"], "M up to 128"), (["--seeds", "0"], "at least 1"),
    (["--beta", "nan"], "finite value > 0"), (["--g", "2"], "in [0, 1]"),
    (["--blocks-env"], "FASTNTM_BLOCKS is set"),
])
def test_sharp_focus_study_refuses_bad_flags(args, message, capsys, monkeypatch):
    from benchmarks import sharp_focus

    if args == ["--blocks-env"]:  # a forced block would override the study's own choice of regime
        monkeypatch.setenv("FASTNTM_BLOCKS", "block_n=16")
        args = []
    with pytest.raises(SystemExit):
        sharp_focus.main(args)
    assert message in capsys.readouterr().err


def test_differential_comparison_passes_the_cpu_backends_and_flags_a_planted_error():
    # Twelve fixed draws of each op in float64: the hand-derived backwards (torch ops, and numba loops where
    # numba imports) within 1e-7 of the literal spec at every shape and edge drawn, where a step whose
    # dL/dgamma is 1e-4 too large is caught; two of each in bf16 and fp16 for the torch path.
    from benchmarks import differential

    backends = ["reference", *(["numba"] if numba_imports() else []), "planted"]

    def planted(op, xs, case):
        if "gamma" in xs:
            xs = {**xs, "gamma": xs["gamma"] + 1e-4 * (xs["gamma"] - xs["gamma"].detach())}
        return differential.call(op, "reference", xs, case)

    ops = list(differential.OPS)
    result = differential.run(backends, ops, torch.float64, None, 12 * len(ops), 0,
                              torch.device("cpu"), planted={"planted": planted}, echo=lambda line: None)
    assert result["draws"] == 12 * len(ops)
    assert {(f["backend"], f["op"], f["value"]) for f in result["flags"]} == {
        ("planted", "memory_step", "dgamma"), ("planted", "address", "dgamma")}
    # 1e-4 of dL/dgamma; less where dL/dgamma is about 0 beside the op's largest value (judged beside that)
    assert max(f["error"] for f in result["flags"]) == pytest.approx(1e-4, rel=0.01)
    for dtype in (torch.bfloat16, torch.float16):  # the torch path's casts: within a few ulps of the spec's own
        result = differential.run(["reference"], ops, dtype, None, 2 * len(ops), 0, torch.device("cpu"),
                                  echo=lambda line: None)
        assert result["flags"] == [], dtype


def test_differential_comparison_command_line(tmp_path, capsys):
    from benchmarks import differential

    json_path = tmp_path / "d.json"
    assert differential.main(["--draws", "6", "--backends", "reference", "--json", str(json_path)]) == 0
    assert "6 draws" in capsys.readouterr().out
    result = json.loads(json_path.read_text())
    assert result["draws"] == 6 and result["flags"] == [] and result["ops"] == list(differential.OPS)
    assert "environment" in result
    differential.main(["--replay", "7", "--backends", "reference", "--ops", "read,write"])
    assert capsys.readouterr().out.startswith("draw 7, write: {'B'")
    refused = [(["--backends", "reference,cuda"], "--backends: each of"), (["--ops", "step"], "--ops: all, or"),
               (["--draws", "0"], "--draws must be > 0")]
    for args, message in refused:
        with pytest.raises(SystemExit):
            differential.main(args)
        assert message in capsys.readouterr().err
