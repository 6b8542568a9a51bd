import json

from conftest import tiny_model

from robint_ray.checkpoint import save_checkpoint
from robint_ray.study import ModelSource, StudyConfig
from robint_ray.study.core import Study


def test_a_study_reads_its_models_from_result_json_written_with_relative_paths(tmp_path):
    """result.json stores paths under OUT as ./...: a study (or a later sitting, with the folder moved)
    finds the trained models through them."""
    out = tmp_path / "moved"
    save_checkpoint(out / "train" / "standard" / "best", tiny_model(0))
    (out / "train").mkdir(exist_ok=True)
    (out / "train" / "result.json").write_text(json.dumps({"standard": {"checkpoint": "./train/standard/best"}}))
    s = Study(StudyConfig(standard=ModelSource(checkpoint="x"), robust=ModelSource(checkpoint="y")), out)
    assert s.model("standard").num_classes == 10
