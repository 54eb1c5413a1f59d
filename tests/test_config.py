"""Job config validation: typos, bad values and overrides give errors that name the field."""

import pytest

from orchestrator.config import JobConfig, load_job_config, validate_job_dict
from orchestrator.contract.errors import ConfigError


def test_tiny_config_loads_and_builds_the_tiny_model():
    job = load_job_config("configs/tiny.yaml")
    model = job.model_config_()
    assert (model.d_model, model.n_layers, model.local_window, model.global_k) == (128, 4, 32, 8)
    assert job.cluster.num_workers == 2 and job.parallel.zero_stage == 2


def test_unknown_key_names_the_key_the_section_and_a_suggestion():
    with pytest.raises(ConfigError) as err:
        validate_job_dict({"model": {"top_k": 8}})
    text = str(err.value)
    assert "model.top_k" in text and "unknown key 'top_k'" in text
    assert "global_k" in text and "local_window" in text  # allowed keys are listed


def test_misspelt_key_gets_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'global_k'"):
        validate_job_dict({"model": {"global_kk": 8}})


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        validate_job_dict({"trainer": {}})


def test_out_of_range_value_names_field_and_value():
    with pytest.raises(ConfigError) as err:
        validate_job_dict({"train": {"steps": 0}})
    assert "train.steps" in str(err.value) and "got 0" in str(err.value)


def test_global_batch_must_be_multiple_of_micro_batch():
    with pytest.raises(
        ConfigError, match=r"global_batch\(30\) is not a multiple of train.micro_batch\(8\)"
    ):
        validate_job_dict({"train": {"global_batch": 30, "micro_batch": 8}})


def test_inconsistent_model_dims_are_a_config_error():
    job = validate_job_dict({"model": {"d_model": 130, "n_heads": 4}})
    with pytest.raises(ConfigError, match=r"d_model\(130\) is not divisible by n_heads\(4\)"):
        job.model_config_()


def test_set_overrides_beat_the_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  steps: 100\nmodel:\n  preset: tiny\n")
    job = load_job_config(path, ["train.steps=7", "model.global_k=4", "cluster.use_gpu=true"])
    assert job.train.steps == 7 and job.model.global_k == 4 and job.cluster.use_gpu is True


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_job_config(None, ["train.steps"])


def test_parallel_auto_shorthand():
    assert validate_job_dict({"parallel": "auto"}).parallel.auto is True
    job = load_job_config(None, ["parallel=auto", "parallel.zero_stage=1"])
    assert job.parallel.auto and job.parallel.zero_stage == 1


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(bad)


def test_json_schema_forbids_unknown_keys():
    schema = JobConfig.model_json_schema()
    assert schema["$defs"]["ModelSection"]["additionalProperties"] is False
    assert (
        "Sliding-window"
        in schema["$defs"]["ModelSection"]["properties"]["local_window"]["description"]
    )


def test_a_bad_set_value_is_blamed_on_the_set_not_the_yaml():
    with pytest.raises(ConfigError) as exc:
        load_job_config("configs/tiny.yaml", ["train.steps=-1"])
    message = str(exc.value)
    assert "train.steps" in message and "from --set train.steps=-1" in message
    assert "change that --set" in message


def test_a_bad_yaml_value_names_the_field_to_change_in_the_yaml(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("train:\n  steps: -1\n")
    with pytest.raises(ConfigError) as exc:
        load_job_config(cfg)
    assert "change train.steps in the YAML" in str(exc.value) and "--set" not in str(exc.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match="the file is empty"):
        load_job_config(cfg)
