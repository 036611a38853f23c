"""scripts.utils.tracking: what --tracking mlflow records, with MONAI's MLFlowHandler on a real SQLite store."""

import json

import pytest
from bundle import ROOT
from ignite.engine import Engine
from mlflow import MlflowClient
from monai.bundle import ConfigParser
from monai.handlers import MLFlowHandler
from scripts.utils import tracking


def test_the_config_monai_names_as_text_is_found_in_output_dir(tmp_path):
    config = tmp_path / "config_20260101_120000.json"
    config.write_text("{}")
    # what ConfigWorkflow.patch_bundle_tracking makes of `--output_dir <path>`: text, not an expression
    assert tracking.executed_config([f"{tmp_path} + '/config_20260101_120000.json'"], tmp_path) == config
    assert tracking.executed_config([str(config)], tmp_path / "elsewhere") == config
    assert tracking.executed_config([None], tmp_path) is None


def run_handler(tmp_path, epochs: int, complete: bool) -> str:
    """One start of a tracked run named 'dhr' whose executed config has ``epochs``; returns the database URI."""
    config = tmp_path / f"config_{epochs}.json"
    config.write_text(json.dumps({"epochs": epochs, "patch_size": [16, 16, 8], "train": {"a": 1}}))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    artifacts = f"{tmp_path} + '/{config.name}'"
    handler = MLFlowHandler(tracking_uri=uri, run_name="dhr", artifacts=artifacts, iteration_log=False)
    tracking.record_config([handler], tmp_path)
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    if complete:
        handler.close()
    return uri


def test_every_key_and_the_config_are_logged_and_a_killed_run_continues_with_other_values(tmp_path):
    uri = run_handler(tmp_path, epochs=2, complete=False)  # killed: the run stays unfinished
    run_handler(tmp_path, epochs=3, complete=True)  # resumed with a larger --epochs: the same run continues
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "dhr"
    assert run.data.params["epochs"] == "2" and run.data.params["patch_size"] == "[16, 16, 8]"
    assert run.data.params["train"] == '{"a": 1}'
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config_2.json", "config_3.json"}


def test_add_artifacts_extends_only_the_mlflow_handlers(tmp_path):
    handler = MLFlowHandler(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}", artifacts=["config.json"])
    other = object()
    tracking.add_artifacts([handler, other], tmp_path / "evaluation")
    assert tuple(handler.artifacts) == ("config.json", str(tmp_path / "evaluation"))


@pytest.mark.parametrize(
    ("configs", "keys", "name"),
    [
        (["pretrain.yaml"], {}, "dhr"),
        (["pretrain.yaml"], {"backbone": "segresnet", "projection_width": "raw"}, "dhr segresnet projection_width=raw"),
        (["pretrain.yaml", "pretrain_vox2vec.yaml"], {}, "vox2vec"),
        (["pretrain.yaml", "pretrain_vox2vec.yaml"], {"backbone": "unet"}, "vox2vec unet"),
    ],
)
def test_a_pretraining_run_is_named_by_its_method_network_and_ablations(configs, keys, name):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in configs])
    parser.update(keys)
    assert parser.get_parsed_content("run_name") == name
