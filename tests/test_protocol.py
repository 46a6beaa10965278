"""The paper's protocol and its statistics: coupled batch order, batch-order ground truths and their
reliability, method runs on one θ0, LDS models, curves, the float-noise check, the dose benchmark."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, tiny_gpt2_config

from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.data.tokenize import tokenize_records
from untrac_pl.evaluation import power
from untrac_pl.evaluation.metrics import evaluate_directory, run_dirs
from untrac_pl.experiments.dose import BEHAVIOUR, behaviour_statements, plant
from untrac_pl.experiments.methods import MethodSpec
from untrac_pl.experiments.protocol import Curve, Protocol, expand_curves, lds_subsets, mean_ground_truth, unigram_baseline
from untrac_pl.experiments.reproduce import ReproduceConfig, SyntheticData, reproduce
from untrac_pl.models import ModelSpec
from untrac_pl.optim import OptimizerSpec
from untrac_pl.scores import ScoreTable
from untrac_pl.training import FitSpec, MixtureBatchSampler, mixture_dataloader


# ------------------------------------------------------------------------------------------------ sampler
def test_leave_group_out_order_is_theta0_stream_with_the_group_skipped():
    allowed_all = list(range(20))
    excluded = {3, 4, 11, 17}
    full = MixtureBatchSampler(allowed_all, batch_size=4, num_steps=30, seed=5)
    loo = MixtureBatchSampler([i for i in allowed_all if i not in excluded], 4, 30, seed=5, universe=allowed_all)
    stream_full = [i for b in full for i in b]
    stream_loo = [i for b in loo for i in b]
    # the left-out run's stream is the full stream with the excluded examples taken out, same order
    skipped = [i for i in stream_full if i not in excluded]
    assert len(skipped) >= 90 and stream_loo[: len(skipped)] == skipped
    # an uncoupled sampler (its own shuffles of the smaller pool) gives another order: the test can fail
    uncoupled = [i for b in MixtureBatchSampler([i for i in allowed_all if i not in excluded], 4, 30, seed=5) for i in b]
    assert uncoupled != stream_loo


def test_order_seed_changes_the_order_only(quickstart):
    from untrac_pl.models import load_tokenizer

    spec = ModelSpec(config=tiny_gpt2_config(0.0), train_tokenizer_vocab=300)
    tok = load_tokenizer(spec, [r["text"] for r in quickstart["train"]])
    corpus = tokenize_records(quickstart["train"], tok, 32, "train")
    batches = lambda fs: [list(b) for b in mixture_dataloader(corpus, fs, tok.pad_token_id).batch_sampler]  # noqa: E731
    base = batches(FitSpec(max_steps=6, batch_size=4, seed=0))
    assert batches(FitSpec(max_steps=6, batch_size=4, seed=0, order_seed=0)) == base
    assert batches(FitSpec(max_steps=6, batch_size=4, seed=0, order_seed=1)) != base


# ------------------------------------------------------------------------------------------------ helpers
def _table(scores, rows, cols, method="m", unit="group") -> ScoreTable:
    return ScoreTable(torch.tensor(scores, dtype=torch.float32), rows, rows, cols, cols, unit, "group", method)


def test_mean_ground_truth_is_the_elementwise_mean():
    a = _table([[1.0, 2.0], [3.0, 4.0]], ["s1", "s2"], ["g1", "g2"], "ground_truth")
    b = _table([[3.0, 0.0], [1.0, 8.0]], ["s1", "s2"], ["g1", "g2"], "ground_truth")
    assert mean_ground_truth([a, b]).scores.tolist() == [[2.0, 1.0], [2.0, 6.0]]
    with pytest.raises(ValueError, match="batch order 1.s ground truth has other queries"):
        mean_ground_truth([a, _table([[1.0, 2.0]], ["s1"], ["g1", "g2"])])


def test_lds_subsets_are_seeded_halves():
    groups = [f"g{i}" for i in range(8)]
    subsets = lds_subsets(groups, 32, 0.5, seed=3)
    assert len(subsets) == 32 and all(len(s) == 4 and len(set(s)) == 4 for s in subsets)
    assert subsets == lds_subsets(groups, 32, 0.5, seed=3) and subsets != lds_subsets(groups, 32, 0.5, seed=4)
    assert len({tuple(s) for s in subsets}) == 32  # no model trained twice
    assert lds_subsets(["a", "b", "c", "d"], 32, 0.5, seed=0) == [["a", "b"], ["a", "c"], ["a", "d"], ["b", "c"], ["b", "d"], ["c", "d"]]


def test_unigram_baseline_by_hand():
    class Corpus:  # labels[0] is never predicted; -100 is ignored
        def __init__(self, labels):
            self.examples = [{"labels": x} for x in labels]

    train = Corpus([[9, 0, 0, 1], [9, 0, -100]])  # counted tokens: 0, 0, 1, 0 -> counts+1: [4, 2, 1]
    test = Corpus([[9, 1, 2]])
    out = unigram_baseline(train, test, 3)
    p = torch.tensor([4.0, 2.0, 1.0]) / 7
    assert out["uniform"] == pytest.approx(math.log(3))
    assert out["train_entropy"] == pytest.approx(float(-(p * p.log()).sum()))
    assert out["test_loss"] == pytest.approx(float(-(p[1].log() + p[2].log()) / 2))


def test_curves_expand_to_labelled_specs():
    inv = MethodSpec(name="untrac_inv", target_unit="group", unlearning=UnlearningSchedule(num_steps=5, num_epochs=None, batch_size=None))
    specs, info = expand_curves(Protocol(curves=[Curve(method="untrac_inv", values=[1, 10])]), [inv])
    assert [s.key for s in specs] == ["untrac_inv@steps=1", "untrac_inv@steps=10"]
    assert [s.unlearning.num_steps for s in specs] == [1, 10] and info["untrac_inv@steps=10"]["value"] == 10
    with pytest.raises(ValueError, match="no entry in methods"):
        expand_curves(Protocol(curves=[Curve(method="untrac")]), [inv])


def test_protocol_refuses_bad_fields():
    with pytest.raises(ValueError, match="batch_orders"):
        Protocol(batch_orders=[0, 0])
    with pytest.raises(ValueError, match="lds_models"):
        Protocol(lds_models=3)
    with pytest.raises(ValueError, match="lds_fraction"):
        Protocol(lds_fraction=1.0)


# ------------------------------------------------------------------------------------------------ end to end
def _tiny(tmp_path: Path, **protocol) -> ReproduceConfig:
    inv = MethodSpec(name="untrac_inv", target_unit="group", optimizer=OptimizerSpec(name="adam", lr=1e-3),
                     unlearning=UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=None), data={"samples_per_group": 8})
    return ReproduceConfig(
        name="tiny", output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), log_dir=str(tmp_path / "tb"), seeds=[0],
        synthetic=SyntheticData(datasets=["A"], n_per_task=12, n_test=8), figures=False,
        model=ModelSpec(config=tiny_gpt2_config(0.0), train_tokenizer_vocab=300), max_length=64, eval_batch_size=64,
        fit=FitSpec(max_steps=12, batch_size=8), methods=[inv, MethodSpec(name="graddot", data={"samples_per_group": 8})],
        protocol=Protocol(**protocol),
    )


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    cfg = _tiny(tmp, batch_orders=[0, 1], runs=[0, 1], lds_models=8, float_noise_threads=2, bootstrap_resamples=100, permutations=100,
                curves=[{"method": "untrac_inv", "values": [1, 2]}])
    reproduce(cfg, command="test")
    return tmp, cfg


def test_protocol_layout_and_ground_truth_is_the_mean_of_the_orders(protocol_run):
    tmp, _ = protocol_run
    seed_dir = tmp / "out" / "scores" / "A" / "seed0"
    assert [p.name for p in run_dirs(seed_dir)] == ["run0", "run1"]
    for run in ("run0", "run1"):
        assert {p.stem for p in (seed_dir / run).glob("*.safetensors")} == {"untrac_inv", "graddot", "untrac_inv@steps=1", "untrac_inv@steps=2"}
    orders = [ScoreTable.load(seed_dir / "orders" / f"ground_truth_order{o}.safetensors") for o in (0, 1)]
    gt = ScoreTable.load(seed_dir / "ground_truth.safetensors")
    assert torch.allclose(gt.scores, (orders[0].scores + orders[1].scores) / 2, atol=1e-6)
    assert not torch.equal(orders[0].scores, orders[1].scores)  # the second order is another training run
    lds = json.loads((seed_dir / "lds.json").read_text())
    assert len(lds["included"]) == 6 and len(lds["losses"]) == 6 and lds["subsets"] == ["test"]  # all 6 halves of 4 tasks


def test_protocol_statistics_match_their_definitions(protocol_run):
    tmp, _ = protocol_run
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    result = metrics["settings"]["A"]
    assert result["runs"] == ["run0", "run1"] and result["methods"]["untrac_inv"]["test_sets"]["test"]["pearson"]["n"] == 2
    stats = result["statistics"]
    seed_dir = tmp / "out" / "scores" / "A" / "seed0"
    o0, o1 = (ScoreTable.load(seed_dir / "orders" / f"ground_truth_order{o}.safetensors").group_level().scores.double()[0] for o in (0, 1))
    r = float(torch.corrcoef(torch.stack([o0, o1]))[0, 1])
    rel = stats["reliability"]["test"]
    assert rel["test_retest"] == pytest.approx(r, abs=1e-5)
    assert rel["mean_reliability"] == pytest.approx(2 * r / (1 + r), abs=1e-5)
    # the reported mean is the mean over the two runs of each run's Pearson with the ground truth
    gt = ScoreTable.load(seed_dir / "ground_truth.safetensors").group_level().scores.double()[0]
    per_run = [float(torch.corrcoef(torch.stack([ScoreTable.load(seed_dir / f"run{k}" / "graddot.safetensors").group_level().scores.double()[0], gt]))[0, 1])
               for k in (0, 1)]
    entry = stats["methods"]["graddot"]["test"]
    assert entry["mean"] == pytest.approx(sum(per_run) / 2, abs=1e-5)
    assert entry["null"]["exact"] and entry["null"]["n"] == 24  # four training tasks: all 4! orderings
    assert entry["ci"][0] <= entry["mean"] + 1e-9 and entry["ci"][1] >= entry["mean"] - 1e-9
    assert stats["lds"]["num_models"] == 6 and "ground_truth" in stats["lds"]["methods"]
    assert set(stats["float_noise"]["methods"]) >= {"untrac_inv", "graddot"}
    assert 0.0 <= stats["float_noise"]["ground_truth_max_change"] < 0.1 * stats["float_noise"]["ground_truth_spread"]
    assert all(v < 0.2 for per in stats["float_noise"]["methods"].values() for v in per.values())  # same run, same data
    assert stats["lds"]["methods"]["ground_truth"]["test"]["lds"] > 0  # leave-one-out effects predict the halves' losses
    assert "untrac_inv@steps=1|gradcos" not in stats["agreement"]  # no GradCos in this run: no check claimed
    md = (tmp / "out" / "results.md").read_text()
    for phrase in ("Ground-truth reliability", "bootstrap 95 % CI", "Group-level LDS", "Float noise", "unigram model", "Pearson against the number of unlearning steps"):
        assert phrase in md


def test_output_dir_defaults_to_runs(tmp_path):
    assert ReproduceConfig(name="exp").output_dir == str(Path("runs") / "exp")


def test_power_reliability_needs_two_orders(tmp_path):
    assert power.reliability(tmp_path) is None


# ------------------------------------------------------------------------------------------------ dose
def test_plant_replaces_in_place_and_keeps_group_sizes():
    blocks = [{"id": f"b{i}", "text": f"t{i}", "group": "a" if i % 2 else "b"} for i in range(40)]
    pool = [{"id": f"planted:{i}", "text": f"toxic {i}"} for i in range(10)]
    out, count = plant(blocks, "a", pool, 0.2, seed=0)
    assert count == 4 and len(out) == len(blocks)
    changed = [i for i, (x, y) in enumerate(zip(blocks, out)) if x != y]
    assert len(changed) == 4 and all(blocks[i]["group"] == "a" and out[i]["group"] == "a" for i in changed)
    assert plant(blocks, "a", pool, 0.0, seed=0) == (blocks, 0)
    # doses are nested: a higher dose keeps every lower dose's statements where they were
    low, _ = plant(blocks, "a", pool, 0.1, seed=0)
    high, _ = plant(blocks, "a", pool, 0.4, seed=0)
    planted_low = {i: r["text"] for i, r in enumerate(low) if r["id"].startswith("planted")}
    assert planted_low and all(high[i]["text"] == text for i, text in planted_low.items())
    with pytest.raises(ValueError, match="dose.group"):
        plant(blocks, "zzz", pool, 0.1, seed=0)


def test_behaviour_statements_are_disjoint_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "tox.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"s{i}", "toxicity_human": 5.0 if i % 3 else 1.0}) for i in range(60)) + "\n")
    pool, tests = behaviour_statements(path, 4.0, 10, seed=0)
    assert len(tests) == 10 and all(t["group"] == BEHAVIOUR for t in tests)
    assert not {p["text"] for p in pool} & {t["text"] for t in tests}
    path.write_text('{"text": "a", "toxicity_human": 5}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"tox.jsonl:2"):
        behaviour_statements(path, 4.0, 1, seed=0)


@pytest.mark.skipif(not (SHARED_DATA / "tests" / "toxigen_annotated.jsonl").exists(), reason="needs ../shared/data (ToxiGen annotated)")
def test_shared_toxigen_has_enough_toxic_statements():
    pool, tests = behaviour_statements(SHARED_DATA / "tests" / "toxigen_annotated.jsonl", 4.0, 64, seed=0)
    assert len(pool) >= 0.2 * 160 and len(tests) == 64


def test_resume_adds_lds_models_and_keeps_the_rest(tmp_path):
    cfg = _tiny(tmp_path, batch_orders=[0, 1], runs=[0], bootstrap_resamples=50, permutations=50)
    reproduce(cfg, command="first")
    seed_dir = tmp_path / "out" / "scores" / "A" / "seed0"
    before = {p.relative_to(seed_dir): p.read_bytes() for p in seed_dir.rglob("*.safetensors") if p.name != "ground_truth.safetensors"}
    gt_before = ScoreTable.load(seed_dir / "ground_truth.safetensors").scores
    assert not (seed_dir / "lds.json").exists()
    cfg.protocol = Protocol(batch_orders=[0, 1], runs=[0], lds_models=8, bootstrap_resamples=50, permutations=50)
    cfg.resume = True
    reproduce(cfg, command="second")
    assert json.loads((seed_dir / "lds.json").read_text())["requested"] == 8
    after = {p.relative_to(seed_dir): p.read_bytes() for p in seed_dir.rglob("*.safetensors") if p.name != "ground_truth.safetensors"}
    assert after == before  # the batch orders' tables and the method files are reused, not recomputed
    assert torch.equal(ScoreTable.load(seed_dir / "ground_truth.safetensors").scores, gt_before)
    history = json.loads((tmp_path / "out" / "invocations.json").read_text())
    assert [h["command"] for h in history] == ["first", "second"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "1. `first`" in md and "2. `second`" in md and "Group-level LDS" in md
    # a method changed under its label in a run folder: refused, naming the file
    from untrac_pl.experiments.reproduce import ReproduceResumeError

    changed = replace(cfg.methods[0], optimizer=OptimizerSpec(name="adam", lr=5e-4))
    cfg.methods = [changed, cfg.methods[1]]
    with pytest.raises(ReproduceResumeError, match=r"run0/untrac_inv.safetensors"):
        reproduce(cfg, command="changed")
    cfg.methods = [replace(changed, optimizer=OptimizerSpec(name="adam", lr=1e-3)), cfg.methods[1]]
    # another set of batch orders is another ground truth: refused on resume
    cfg.protocol = Protocol(batch_orders=[0, 2], runs=[0])
    with pytest.raises(ValueError, match="batch_orders"):
        reproduce(cfg, command="third")


def test_dose_benchmark_end_to_end_on_generated_corpora(tmp_path):
    from untrac_pl.experiments.dose import DoseSpec

    # a behaviour nothing else in the corpora looks like: made-up words in one template
    words = ["zorblax", "quintuple", "frobnicate", "vortex", "zeppelin", "gadget", "purple", "nightly"]
    lines = [json.dumps({"text": f"the {words[i % 8]} {words[(i * 3) % 8]} will {words[(i * 5) % 8]} every {words[(i + 1) % 8]}",
                         "toxicity_human": 5.0}) for i in range(80)]
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "tox.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _tiny(tmp_path)
    cfg.experiment = "dose"
    cfg.corpora = replace(cfg.corpora, source="generated", tests_dir=str(tmp_path / "tests"), generated_docs_per_corpus=30, blocks_per_corpus=20,
                          block_size=32, tokenizer_docs_per_corpus=30)
    cfg.dose = DoseSpec(group="forum", doses=[0.0, 0.25, 0.5], source_file="tox.jsonl", test_samples=8)
    cfg.methods = [MethodSpec(name="graddot", data={"samples_per_group": 20})]
    cfg.fit = FitSpec(max_steps=30, batch_size=8)
    cfg.threads, cfg.workers, cfg.protocol = 2, 2, Protocol(float_noise_threads=2)  # doses in two 1-thread workers; top dose re-run with 2
    reproduce(cfg, command="dose test")
    record = json.loads((tmp_path / "out" / "dose.json").read_text())
    assert [d["planted"] for d in record["doses"].values()] == [0, 5, 10]
    z = [d["methods"]["graddot"]["z"] for d in record["doses"].values()]
    assert z[-1] > z[0]  # planting the behaviour raises the planted group's standing
    assert set(record["dose_response"]["graddot"]) == {"spearman", "pearson", "monotone"}
    noise = record["float_noise"]
    assert noise["dose"] == 0.5 and noise["threads"] == 2 and noise["default_threads"] == 1
    assert noise["methods"]["graddot"]["score_change_in_spread"] < 0.1  # rounding alone: far below the spread of the groups
    assert all(math.isfinite(d["test_loss"]) and 0 < d["unigram"]["train_entropy"] <= d["unigram"]["uniform"] for d in record["doses"].values())
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Spearman (score vs dose)" in md and (tmp_path / "out" / "dose.png").exists()
    assert "Float noise: the 50 % dose re-run with 2 torch thread(s) instead of 1" in md and "a unigram model of the training tokens" in md
    (tmp_path / "out" / "results.md").unlink()
    cfg.evaluate_only = True  # the report again from dose.json, nothing retrained
    reproduce(cfg, command="again")
    assert (tmp_path / "out" / "results.md").read_text() == md


def test_stored_configuration_without_newer_fields_still_resumes():
    from untrac_pl.experiments.reproduce import _comparable_shared, shared_fingerprint

    cfg = ReproduceConfig(name="x")
    shared = shared_fingerprint(cfg, "A", {})
    older = json.loads(json.dumps(shared))
    for key in ("gguf_file", "gguf_cache_dir"):
        del older["model"][key]
    del older["fit"]["order_seed"]
    assert _comparable_shared(older) == shared
    older["fit"]["max_steps"] = 7  # a real difference still shows
    assert _comparable_shared(older) != shared


# ------------------------------------------------------------------------------------------------ worker pool
def test_two_worker_processes_give_the_same_bytes_as_one_process(tmp_path):
    """``workers: 2`` (two spawned 1-thread processes) against ``workers: 1`` with one thread: every score
    file and the LDS record identical, byte for byte (the pool changes where a job runs, never its sums)."""
    outputs = {}
    for workers, threads in ((1, 1), (2, 2)):
        cfg = _tiny(tmp_path / f"w{workers}", batch_orders=[0, 1], runs=[0, 1], lds_models=8, bootstrap_resamples=50, permutations=50)
        cfg.workers, cfg.threads = workers, threads
        reproduce(cfg, command=f"workers {workers}")
        seed_dir = tmp_path / f"w{workers}" / "out" / "scores" / "A" / "seed0"
        outputs[workers] = {str(p.relative_to(seed_dir)): ScoreTable.load(p).scores for p in seed_dir.rglob("*.safetensors")}
        outputs[workers]["lds"] = torch.tensor(json.loads((seed_dir / "lds.json").read_text())["losses"], dtype=torch.float64)
    assert set(outputs[1]) == set(outputs[2]) and len(outputs[1]) >= 7  # GT, two orders, 2 runs x 2 methods, LDS
    for key, value in outputs[1].items():
        assert torch.equal(value, outputs[2][key]), key
    assert not torch.equal(outputs[1]["orders/ground_truth_order0.safetensors"], outputs[1]["orders/ground_truth_order1.safetensors"])


def test_workers_must_be_positive_and_float_noise_needs_another_thread_count(tmp_path):
    with pytest.raises(ValueError, match="workers=0"):
        ReproduceConfig(name="x", workers=0)
    cfg = _tiny(tmp_path, float_noise_threads=1)
    cfg.workers, cfg.threads = 2, 2  # each job runs with one thread: a one-thread re-run would repeat it
    with pytest.raises(ValueError, match="float_noise_threads=1"):
        reproduce(cfg, command="x")


def test_resume_with_another_thread_count_per_job_is_refused(tmp_path):
    """The stored ground truth was trained at one thread per job; new models at two would round otherwise."""
    from untrac_pl.experiments.reproduce import ReproduceResumeError

    cfg = _tiny(tmp_path, batch_orders=[0, 1], runs=[0], bootstrap_resamples=50, permutations=50)
    cfg.threads, cfg.workers = 1, 1
    reproduce(cfg, command="first")
    cfg.threads, cfg.resume = 2, True
    cfg.protocol = Protocol(batch_orders=[0, 1], runs=[0], lds_models=8, bootstrap_resamples=50, permutations=50)
    with pytest.raises(ReproduceResumeError, match="1 torch thread"):
        reproduce(cfg, command="second")


def _marked_job(payload: dict, job: tuple) -> int:
    """A pool job (module level: spawned workers import it): job 0 fails at once, the others take a while."""
    import time

    index, folder = job
    Path(folder, f"started-{index}").write_text("")
    if index == 0:
        raise RuntimeError("job 0 failed")
    time.sleep(1.5)
    return index


def test_a_failing_job_stops_the_pool_without_running_the_queue(tmp_path):
    """The first failure is raised once it happens; queued jobs are dropped, not run to the end first."""
    from untrac_pl.experiments.pool import JobPool

    with JobPool({}, workers=2, threads=1) as pool:
        with pytest.raises(RuntimeError, match="job 0 failed"):
            pool.map(_marked_job, [(i, str(tmp_path)) for i in range(12)])
    started = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("started-*"))
    # the failing job, the running one and what the executor had already handed over (old behaviour: all 12)
    assert 0 in started and len(started) <= 8, started


def test_a_method_registered_in_main_is_refused_before_any_fit_when_workers_are_spawned():
    from untrac_pl.experiments.jobs import check_methods_reach_workers
    from untrac_pl.methods import register
    from untrac_pl.methods.gradient import GradDot
    from untrac_pl.methods.registry import defining_modules, unregister

    in_main = type("InMain", (GradDot,), {"name": "in_main", "display": "In main", "aliases": (), "__module__": "__main__"})
    elsewhere = type("Elsewhere", (GradDot,), {"name": "elsewhere", "display": "Elsewhere", "aliases": (), "__module__": "my_methods"})
    register(in_main), register(elsewhere)
    try:
        check_methods_reach_workers([MethodSpec(name="in_main")], workers=1)  # this process knows it
        with pytest.raises(Exception, match=r"methods\[in_main\]: method 'in_main' is registered in __main__.*workers: 1"):
            check_methods_reach_workers([MethodSpec(name="graddot"), MethodSpec(name="in_main")], workers=2)
        check_methods_reach_workers([MethodSpec(name="elsewhere")], workers=2)
        assert defining_modules() == ["my_methods"]  # what every worker imports before its first job
    finally:
        unregister("in_main"), unregister("elsewhere")
