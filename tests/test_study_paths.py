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


def test_a_stage_writes_no_path_of_this_machine_and_reads_its_own_back(tmp_path):
    outside = tmp_path / "configs" / "model.yaml"
    outside.parent.mkdir()
    outside.write_text("x")
    s = Study(StudyConfig(standard=ModelSource(checkpoint="x"), robust=ModelSource(checkpoint="y")), tmp_path / "out")

    def fn(folder):
        (folder / "f.txt").write_text("f")
        return {"file": str(folder / "f.txt"), "config": str(outside), "kind": "predicted"}

    first = s.stage("s", fn)
    stored = json.loads((tmp_path / "out" / "s" / "result.json").read_text())
    assert (
        stored["file"] == "./s/f.txt" and stored["config"] == "../configs/model.yaml" and stored["kind"] == "predicted"
    )
    again = s.stage("s", fn)  # done before: read back, "./" under OUT again
    assert again["file"] == first["file"] == str(tmp_path / "out" / "s" / "f.txt")


def test_the_training_stage_leaves_no_path_of_this_machine_in_the_best_checkpoints_meta(tmp_path, monkeypatch):
    """A trained model's best/meta.json holds its training config (the data, the initial weights): the
    stage rewrites those paths relative to OUT, as in result.json (the committed CPU study is checked so)."""
    from robint_ray.study import training

    data = tmp_path / "data" / "set.npz"
    data.parent.mkdir()
    data.write_bytes(b"x")
    meta = {"arch": "a", "config": {"data": {"path": str(data)}, "init": str(tmp_path / "out" / "w.pt")}}

    def fake_train(config, run_dir, **_):
        (run_dir / "best" / "meta.json").write_text(json.dumps(meta))
        (run_dir / "metrics.jsonl").write_text("")

    monkeypatch.setattr(training, "train_run", fake_train)
    config = StudyConfig(standard=ModelSource(checkpoint="x"), robust=ModelSource(train="robust.yaml"))
    s = Study(config, tmp_path / "out")
    monkeypatch.setattr(Study, "train_config", lambda self, name: None)
    training.run(s, s.out / "train")
    stored = json.loads((tmp_path / "out" / "train" / "robust" / "best" / "meta.json").read_text())
    assert stored == {"arch": "a", "config": {"data": {"path": "../data/set.npz"}, "init": "./w.pt"}}
