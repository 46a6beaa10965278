"""Scaling experiment: per-model parameters / runtime / memory, seed JSON layout, plot, failures, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from untrac_pl.compat import UnTracConfig
from untrac_pl.experiments.scaling import ScalingExperiment, ScalingExperimentConfig

REPO = Path(__file__).resolve().parents[1]



def _tiny(name: str, n_layer: int, n_embd: int) -> dict:
    return {"name": name, "config": {"model_type": "gpt2", "n_layer": n_layer, "n_head": 2, "n_embd": n_embd, "n_positions": 64},
            "train_tokenizer_vocab": 300}


def test_scaling_records_parameters_runtime_memory_and_failures(tmp_path):
    config = ScalingExperimentConfig(
        models_to_test=[_tiny("tiny-1x16", 1, 16), _tiny("tiny-2x48", 2, 48), str(tmp_path / "no-such-model")],
        sample_size=8,
        test_cases=2,
        untrac=UnTracConfig(unlearning_rate=1e-3, unlearning_steps=1, device="cpu", max_length=48),
        output_dir=str(tmp_path / "out"),
        top_k=3,
    )
    experiment = ScalingExperiment(config)
    results = experiment.run_scaling_experiment()
    png = experiment.plot_results()
    on_disk = json.loads((tmp_path / "out" / "scaling_experiment_results.json").read_text())
    summary = on_disk["summary"]
    assert summary["total_models_tested"] == 3 and summary["successful_models"] == 2
    assert "no-such-model" in next(iter(summary["failed_models"].values()))
    assert on_disk["models"][str(tmp_path / "no-such-model")]["success"] is False
    rows = summary["comparison"]
    assert [r["model"] for r in rows] == ["tiny-1x16", "tiny-2x48"]
    for row in rows:
        assert {"model", "parameters", "runtime_seconds", "memory_gb"} <= set(row)
        assert row["runtime_seconds"] > 0 and row["memory_gb"] > 0
        model = on_disk["models"][row["model"]]
        assert len(model["influence_results"]) == 2
        assert all(len(r["top_influences"]) == 3 for r in model["influence_results"])
        assert model["memory"]["unlearning"]["peak_gb"] <= row["memory_gb"]
    # parameter counts are the models' own: embeddings (vocab 300 + 64 positions) + blocks + final norm
    for row, (layers, width) in zip(rows, ((1, 16), (2, 48))):
        block = 12 * width * width + 13 * width
        assert row["parameters"] == (300 + 64) * width + layers * block + 2 * width
    assert results["summary"] == on_disk["summary"]
    assert png is not None and png.stat().st_size > 1000


def test_quantized_models_run_or_fail_with_a_clear_record(tmp_path):
    import importlib.util

    config = ScalingExperimentConfig(models_to_test=[_tiny("tiny", 1, 16)], use_quantization=True, quantization_bits=8, sample_size=8,
                                     test_cases=2, untrac=UnTracConfig(device="cpu", max_length=48), output_dir=str(tmp_path))
    results = ScalingExperiment(config).run_scaling_experiment()
    model = results["models"]["tiny"]
    if importlib.util.find_spec("untrac_pl.quantization") is None:
        assert results["summary"]["successful_models"] == 0 and "untrac_pl.quantization" in model["error"]
    else:
        assert model["success"], model.get("error")
        assert model["quantization"] == {"bits": 8}
        assert model["parameters"] == (300 + 64) * 16 + (12 * 16 * 16 + 13 * 16) + 2 * 16  # the base, unpacked


def test_default_models_and_configs(capsys):
    from untrac_pl.cli import main

    assert ScalingExperimentConfig().models_to_test == ["gpt2", "gpt2-medium", "gpt2-large"]
    for name in ("scaling.yaml", "scaling_offline.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            main(["scaling", "-c", str(REPO / "configs" / name), "--print_config"])
        assert exit_info.value.code in (0, None)
        assert "models_to_test:" in capsys.readouterr().out


def test_cli_runs_the_offline_engine(tmp_path):
    from untrac_pl.cli import main

    (tmp_path / "s.yaml").write_text(f"""
models_to_test:
  - {{name: t, config: {{model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 16, n_positions: 64}}, train_tokenizer_vocab: 300}}
sample_size: 6
test_cases: 1
untrac: {{device: cpu, unlearning_rate: 1.0e-3, max_length: 48}}
output_dir: {tmp_path / 'out'}
""")
    assert main(["scaling", "-c", str(tmp_path / "s.yaml")]) == 0
    results = json.loads((tmp_path / "out" / "scaling_experiment_results.json").read_text())
    assert results["command"].startswith("untrac-pl scaling -c")
    assert (tmp_path / "out" / "scaling_results.png").exists()
