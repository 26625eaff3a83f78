"""open_clip backbone: tiny config registered, local weight files, clear errors without weights."""
import open_clip
import pytest
import torch
from omegaconf import OmegaConf

from model.backbone import build_model, create_backbone
from model.optim import param_groups
from utils.runtime import UserError


def test_tiny_config_is_registered():
    assert "ma-tiny" in open_clip.list_models()


def test_local_weight_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    reference, *_ = create_backbone("ma-tiny")
    path = tmp_path / "tiny_weights.pt"
    torch.save(reference.state_dict(), path)
    torch.manual_seed(2)  # a different random init, then overwritten by the file
    loaded, *_ = create_backbone("ma-tiny", str(path))
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_weight_file_is_a_clear_error():
    with pytest.raises(UserError, match="weight file '/nonexistent/w.pt'.*model.pretrained"):
        create_backbone("ma-tiny", "/nonexistent/w.pt")


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(UserError, match="unknown backbone 'ViT-Q-99'"):
        create_backbone("ViT-Q-99")


def test_tag_without_network_says_how_to_get_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(UserError) as err:
        create_backbone("ViT-B-32", "openai")
    msg = str(err.value)
    assert "cannot download" in msg and "model.pretrained=/path/to/file" in msg and "create_model('ViT-B-32'" in msg


def test_clip_lr_reaches_only_the_backbone():
    mcfg = OmegaConf.create(dict(backbone="ma-tiny", pretrained=None, n_mode=4, temperature=2.6592))
    model, *_ = build_model(mcfg)
    groups = param_groups(model, lr=1e-3, clip_lr=5e-8, weight_decay=0.1)
    backbone_ids = {id(p) for p in model.clip.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        if g["lr"] == 5e-8:
            assert ids <= backbone_ids
        else:
            assert g["lr"] == 1e-3 and not ids & backbone_ids
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    assert not model.clip.logit_scale.requires_grad  # open_clip's unused scale stays out of training
    head = {id(model.modes.weight), id(model.disc.weight), id(model.disc.bias), id(model.logit_scale)}
    assert head <= {id(p) for g in groups if g["lr"] == 1e-3 for p in g["params"]}
    assert all(g["weight_decay"] == 0.1 for g in groups)  # the authors decay every parameter
    assert [g["name"] for g in groups] == ["clip", "head"]
