"""The method registry: one declaration makes a method available to every front end.

A toy method is registered inside this file (nothing else in the package knows it) and run through
``untrac-pl attribute`` and through a reproduction's evaluation: that a method is one class is the
point of the registry.
"""
from __future__ import annotations

import json
from dataclasses import field, make_dataclass

import pytest
import torch
from conftest import REPO

from untrac_pl.errors import MethodOptionError
from untrac_pl.methods import (
    GradientMethod,
    canonical_name,
    display_name,
    get_method,
    method_names,
    register,
    unregister,
)
from untrac_pl.scores import ScoreTable


def _overlap(model, train, queries, *, train_groups=None, query_groups=None, scale: float = 1.0, pad_token_id: int = 0) -> dict:
    """Token-set overlap |q ∩ t| / |q| × scale: a query's verbatim copy scores 1 × scale (independent of the model)."""
    q_sets = [set(e["input_ids"]) for e in queries]
    t_sets = [set(e["input_ids"]) for e in train]
    scores = torch.tensor([[len(q & t) / max(1, len(q)) * scale for t in t_sets] for q in q_sets])
    out = {"example_scores": scores, "group_scores": None, "train_groups": None, "query_groups": None, "info": {"scale": scale}}
    if train_groups is not None:
        tnames = list(dict.fromkeys(train_groups))
        qnames = list(dict.fromkeys(query_groups)) if query_groups is not None else None
        cols = torch.stack([scores[:, [i for i, g in enumerate(train_groups) if g == name]].mean(1) for name in tnames], 1)
        rows = cols if qnames is None else torch.stack([cols[[i for i, g in enumerate(query_groups) if g == name]].mean(0) for name in qnames])
        out.update(group_scores=rows, train_groups=tnames, query_groups=qnames or list(range(len(q_sets))))
    return out


@pytest.fixture
def toy_method():
    class TokenOverlap(GradientMethod):
        name, display, aliases = "token_overlap", "Token overlap", ("overlap",)
        fn = staticmethod(_overlap)
        Options = make_dataclass("TokenOverlapOptions", [("scale", float, field(default=1.0)), ("pad_token_id", int, field(default=0))])

    register(TokenOverlap)
    yield TokenOverlap
    unregister("token_overlap")
    assert "token_overlap" not in method_names()


def test_registry_names_aliases_and_display_names():
    assert method_names() == ("untrac", "untrac_inv", "graddot", "gradcos", "tracin", "hif_lissa", "hif_arnoldi", "ekfac")
    assert method_names("unlearning") == ("untrac", "untrac_inv")
    assert canonical_name("untrac-inv") == canonical_name("UnTrac_Inv") == "untrac_inv"
    assert canonical_name("lissa") == "hif_lissa" and canonical_name("tracincp") == "tracin"
    assert display_name("untrac_inv") == "UnTrac-Inv" and display_name("hif_arnoldi") == "HIF (Arnoldi)"
    assert display_name("untrac@sgd@0.001") == "untrac@sgd@0.001"  # a sweep label is shown as it is
    with pytest.raises(MethodOptionError, match=r"method 'untrak' is unknown; choose one of untrac, .* \(did you mean 'untrac'\?\)"):
        get_method("untrak")
    for name in method_names():  # every method documents its options
        method = get_method(name)
        assert method.display and method.Options.__doc__ and method.kind in ("unlearning", "gradient")


def test_a_method_registered_in_a_test_runs_through_untrac_pl_attribute(toy_method, tmp_path):
    from untrac_pl.cli import main

    out = tmp_path / "toy"
    code = main(["attribute", "-c", str(REPO / "configs" / "quickstart.yaml"), "--attribution.method", "overlap",
                 "--attribution.baseline", "{scale: 2.0}", f"--attribution.output_dir={out}", "--trainer.enable_progress_bar=false"])
    assert code == 0
    table = ScoreTable.load(out / "scores.safetensors")
    assert table.method == "token_overlap" and table.metadata["baseline"] == {"scale": 2.0}
    # the score of each query against the training text with the most shared tokens is the overlap itself
    assert float(table.scores.max()) <= 2.0 and float(table.scores.min()) >= 0.0 and float(table.scores.max()) > 0.5
    rankings = json.loads((out / "rankings.json").read_text())
    assert rankings["method"] == "token_overlap" and len(rankings["queries"]) == len(table.row_ids)
    assert (out / "baseline_group_scores.safetensors").exists()
    with pytest.raises(MethodOptionError, match=r"token_overlap has no option 'scal' \(did you mean 'scale'\?\)"):
        from untrac_pl.methods import check_options

        check_options("overlap", {"scal": 1.0}, where="attribution.baseline")


def test_a_method_registered_in_a_test_runs_through_a_reproduction(toy_method, tmp_path, quickstart):
    from test_reproduce import _cfg, _planted_data

    from untrac_pl.evaluation.metrics import evaluate_directory
    from untrac_pl.evaluation.report import write_report
    from untrac_pl.experiments.methods import MethodSpec
    from untrac_pl.experiments.reproduce import run_setting_seed

    cfg = _cfg(tmp_path)
    seed_dir = tmp_path / "scores" / "toy" / "seed0"
    run_setting_seed(cfg, "toy", 0, [MethodSpec(name="token-overlap", label="overlap")], seed_dir, {"accelerator": "cpu"},
                     data=_planted_data(quickstart))
    table = ScoreTable.load(seed_dir / "overlap.safetensors").group_level()
    # the planted group holds the test strings verbatim: the toy puts it first
    assert table.col_ids[int(torch.argmax(table.scores[0]))] == "planted"
    metrics = evaluate_directory(tmp_path / "scores")
    assert "overlap" in metrics["toy"]["methods"]
    written = write_report(metrics, tmp_path / "report", title="toy", command="test", method_names=["overlap"], figures=False)
    assert "overlap" in (tmp_path / "report" / "results.md").read_text() and written["markdown"]


def test_each_baselines_options_are_exactly_its_scoring_functions_keywords():
    """The Options dataclasses document the options; the scoring functions take them. They must not drift."""
    import inspect
    from dataclasses import fields

    from untrac_pl.baselines.scores import _Setup

    # progress: the run's bar; example_scores: set by reproduce (group matrix only); neither is an option
    reserved = {"self", "model", "train", "queries", "train_groups", "query_groups", "progress", "hessian_progress", "example_scores"}

    def keywords(fn):
        params = inspect.signature(fn).parameters.values()
        names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in reserved]
        return names, any(p.kind == p.VAR_KEYWORD for p in params)

    for name in method_names("gradient"):
        method = get_method(name)
        taken, forwards = keywords(type(method).fn)
        if forwards and name != "ekfac":  # **opts go to _Setup (ekfac's **unused only collects options to refuse)
            taken += [n for n in keywords(_Setup.__init__)[0] if n not in taken]
        declared = [f.name for f in fields(method.Options) if not f.metadata.get("runner")]
        assert declared == taken, name


def test_help_documents_every_method_and_its_options(capsys):
    from dataclasses import fields

    from untrac_pl.cli import main

    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    text = capsys.readouterr().out
    epilog = text[text.index("methods (attribution.method)"):]
    for name in method_names():
        method = get_method(name)
        assert f"  {name}: {method.display}" in epilog
        for f in fields(method.Options):
            assert f"      {f.name} = {f.default!r}" in epilog, (name, f.name)
    assert "attribution.method METHOD" in text and "hyphens and aliases" in text  # the field's own docstring


def test_a_method_of_a_new_kind_needs_only_the_base_class_hooks(tmp_path):
    """Subclassing AttributionMethod itself (not one of the two built-in kinds): plan + score_targets."""
    from dataclasses import dataclass

    from untrac_pl.methods import AttributionMethod, check_options, query_targets

    @dataclass
    class LengthOptions:
        """Options of the toy.

        Args:
            power: exponent of the length ratio
        """

        power: float = 1.0

    class LengthRatio(AttributionMethod):
        name, display = "length_ratio", "Length ratio"
        Options = LengthOptions

        def plan(self, config, datamodule, module):
            return query_targets(self.name, datamodule.query_corpus, datamodule.train_corpus, config.target_unit, config.seed)

        def score_targets(self, ctx):
            power = ctx.options.get("power", 1.0)
            q = torch.tensor([float(len(e["input_ids"])) for e in ctx.plan.target_corpus.examples])
            t = torch.tensor([float(len(e["input_ids"])) for e in ctx.plan.eval_corpus.examples])
            ctx.writer.set_matrix((t[None, :] / q[:, None]) ** power)

    register(LengthRatio)
    try:
        assert check_options("length_ratio", {"power": 2.0}) == {"power": 2.0}
        with pytest.raises(MethodOptionError, match="length_ratio has no option 'powr' \\(did you mean 'power'\\?\\)"):
            check_options("length_ratio", {"powr": 2.0}, where="attribution.baseline")
        import untrac_pl

        table = untrac_pl.attribute(["a b c d", "a b"], ["a b c d"], method="length_ratio", options={"power": 2.0},
                                    model={"config": {"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 16},
                                           "train_tokenizer_vocab": 260},
                                    max_length=16, trainer={"accelerator": "cpu"}, output_dir=str(tmp_path / "run"))
        assert table.method == "length_ratio" and table.scores.shape == (1, 2)
        assert float(table.scores[0, 0]) == 1.0 and float(table.scores[0, 1]) < 1.0  # the same text has ratio 1
        assert (tmp_path / "run" / "scores.safetensors").exists()
    finally:
        unregister("length_ratio")
