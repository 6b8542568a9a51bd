"""Models and checkpoints: normalisation inside, R(x), our format, foreign weights, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from robint_ray.checkpoint import load_checkpoint, load_weights, save_checkpoint
from robint_ray.errors import InputError
from robint_ray.models import Representation, build_model, in_mode


@pytest.mark.parametrize(
    "arch,size,dim", [("cifar_resnet8", 32, 64), ("cifar_resnet18", 32, 512), ("resnet18", 128, 512)]
)
def test_forward_and_representation(arch, size, dim):
    torch.manual_seed(0)
    model = build_model(arch, 7).eval()
    x = torch.rand(2, 3, size, size)
    r = model.representation(x)
    assert r.shape == (2, dim) and model.representation_dim == dim
    torch.testing.assert_close(model(x), model.head(r))
    torch.testing.assert_close(Representation(model)(x), r)


def test_resnet50_is_the_paper_model():
    model = build_model("resnet50")
    assert model.num_classes == 150 and model.representation_dim == 2048 and model.input_size == 128
    assert sum(p.numel() for p in model.parameters()) > 23e6


def test_pretrained_resnet20_classifies(resnet20, cifar_exact):
    from robint_ray.data import load_split, stack

    x, y = stack(load_split(cifar_exact, "test"))
    with torch.no_grad():
        accuracy = (resnet20(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(0.9164, abs=1e-3)  # the shared README's figure


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("cifar_resnet8").eval()
    save_checkpoint(tmp_path / "ck", model, classes=list("abcdefghij"), config={"lr": 0.1}, metrics={"acc": 0.5})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["meta.json", "model.safetensors"]
    loaded, meta = load_checkpoint(tmp_path / "ck")
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert meta["config"] == {"lr": 0.1} and meta["classes"][1] == "b" and meta["arch"] == "cifar_resnet8"


def test_checkpoint_errors(tmp_path):
    model = build_model("cifar_resnet8")
    save_checkpoint(tmp_path / "ck", model)
    with pytest.raises(InputError, match="is a cifar_resnet8, not a cifar_resnet20"):
        load_checkpoint(tmp_path / "ck", arch="cifar_resnet20")
    with pytest.raises(InputError, match="has 10 classes, not 100"):
        load_checkpoint(tmp_path / "ck", num_classes=100)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    meta.pop("sha256")
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "meta.json").write_text("{not json")
    with pytest.raises(InputError, match="corrupt metadata"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(InputError, match="not a robint checkpoint"):
        load_checkpoint(tmp_path)


def test_foreign_weights(tmp_path, resnet20_path):
    with pytest.raises(InputError, match="does not fit architecture cifar_resnet32"):
        load_weights("cifar_resnet32", resnet20_path)
    with pytest.raises(InputError, match="does not fit architecture cifar_resnet18"):
        load_weights("cifar_resnet18", resnet20_path)
    truncated = tmp_path / "t.th"
    truncated.write_bytes(resnet20_path.read_bytes()[:5000])
    with pytest.raises(InputError, match="corrupt, truncated or not a weights file"):
        load_weights("cifar_resnet20", truncated)
    with pytest.raises(InputError, match="unknown architecture"):
        load_weights("resnet7", resnet20_path)


class Evil:
    """A pickle that would run code (print) when loaded without weights_only."""

    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "name, write, reason",
    [
        ("notes.txt", lambda path: path.write_text("# weights\n1 2 3\n"), "Unsupported operand"),
        ("evil.pt", lambda path: torch.save({"state_dict": {"x": Evil()}}, path), "Unsupported global: GLOBAL "),
    ],
)
def test_a_file_that_is_not_safe_weights_is_refused_in_one_line_naming_it(tmp_path, capsys, name, write, reason):
    path = tmp_path / name
    write(path)
    with pytest.raises(InputError) as refused:
        load_weights("cifar_resnet8", path)
    message = str(refused.value)
    assert message.startswith(f"{path}: not a weights file torch can load safely (weights_only=True refused it: ")
    assert reason in message and len(message.splitlines()) == 1 and "\x1b" not in message, message
    assert "pwned" not in capsys.readouterr().out  # the pickled call never ran


def test_plain_text_and_truncated_files_are_refused_in_one_line(tmp_path, resnet20_path):
    text = tmp_path / "readme.th"
    text.write_text("hello world\n")
    truncated = tmp_path / "t.th"
    truncated.write_bytes(resnet20_path.read_bytes()[:5000])
    for path in (text, truncated):
        with pytest.raises(InputError, match="corrupt, truncated or not a weights file") as refused:
            load_weights("cifar_resnet20", path)
        assert str(refused.value).startswith(f"{path}: ") and len(str(refused.value).splitlines()) == 1


def test_one_file_hasher_for_checkpoints_and_the_fid_weights_cache(tmp_path):
    import hashlib

    from robint_ray import checkpoint, inception
    from robint_ray.files import file_hash

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 5000)  # > 1 MiB: several blocks
    assert file_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_hash(path, "sha1") == hashlib.sha1(path.read_bytes()).hexdigest()
    assert checkpoint.file_hash is file_hash and inception.file_hash is file_hash


def _mixed_modes(model):
    """train / eval per submodule, for comparing before and after."""
    return [(name, m.training) for name, m in model.named_modules()]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_in_mode_restores_each_submodules_own_mode_also_after_an_exception(mode):
    model = build_model("cifar_resnet8", 10).train()
    model.body.layer1.eval()  # one submodule in eval mode, the rest in train mode
    before = _mixed_modes(model)
    with in_mode(model, mode):
        assert all(m.training == (mode == "train") for m in model.modules())
    assert _mixed_modes(model) == before
    with pytest.raises(RuntimeError, match="inside"):
        with in_mode(model, mode):
            raise RuntimeError("inside the block")
    assert _mixed_modes(model) == before
    with pytest.raises(InputError, match="model_mode"):
        with in_mode(model, "test"):
            pass
    assert _mixed_modes(model) == before


def test_every_eval_mode_helper_keeps_a_mixed_model_as_it_was():
    from torch.utils.data import TensorDataset

    from robint_ray import attributions, evaluate, explain, visualize

    torch.manual_seed(0)
    model = build_model("cifar_resnet8", 10).train()
    model.body.layer1.eval()
    before = _mixed_modes(model)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    visualize.representation(model, x)
    visualize.logits(model, x)
    explain.predict(model, x)
    attributions.integrated_gradients(model, x, y, torch.zeros(2, 1, 3, 32, 32), steps=2)
    attributions.deletion_insertion(model, x, y, torch.rand(2, 3, 32, 32), steps=2)
    evaluate.correctness(model, TensorDataset(x, y))
    assert _mixed_modes(model) == before
