"""open_clip backbone: tiny config registered, local weight files, clear errors without weights."""

import open_clip
import pytest
import torch

from open_clip.transformer import QuickGELU

from model.backbone import build_model, create_backbone, uses_quick_gelu
from model.optim import param_groups
from tests.conftest import tiny_model_cfg
from runtime.errors import UserError


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
    assert (
        "cannot download" in msg
        and "model.pretrained=/path/to/file" in msg
        and "create_model('ViT-B-32'" in msg
    )


def test_clip_lr_reaches_only_the_backbone_and_its_logit_scale():
    model, *_ = build_model(tiny_model_cfg())
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
    assert all(g["weight_decay"] == 0.1 for g in groups)  # the authors decay every parameter
    assert [g["name"] for g in groups] == ["clip", "head"]
    assert id(model.clip.logit_scale) in {
        id(p) for g in groups if g["lr"] == 5e-8 for p in g["params"]
    }
    head = {id(model.modes.weight), id(model.disc.weight), id(model.disc.bias)}
    assert head == {id(p) for g in groups if g["lr"] == 1e-3 for p in g["params"]}


def test_logit_scale_is_the_clip_models_own_reset_to_temperature():
    model, *_ = build_model(tiny_model_cfg(temperature=3.0))
    assert model.clip.logit_scale.item() == pytest.approx(3.0)
    assert model.clip.logit_scale.requires_grad
    assert "logit_scale" not in dict(model.named_parameters())


def test_checkpoint_with_the_older_separate_scale_still_loads():
    model, *_ = build_model(tiny_model_cfg())
    old = model.state_dict()
    old["logit_scale"] = torch.tensor(
        4.5
    )  # trained scale; clip.logit_scale was open_clip's frozen one
    fresh, *_ = build_model(tiny_model_cfg())
    fresh.load_state_dict(old)
    assert fresh.clip.logit_scale.item() == 4.5


def test_mode_vectors_have_pytorchs_default_init():
    torch.manual_seed(0)
    model, *_ = build_model(tiny_model_cfg())
    norms = model.modes.weight.norm(dim=-1)
    d = model.modes.weight.shape[1]  # N(0, 1) entries: norm about sqrt(d)
    assert ((norms > 0.8 * d**0.5) & (norms < 1.2 * d**0.5)).all(), norms


def test_vit_b_32_with_openai_weights_is_built_with_quick_gelu_without_download(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
    clip, *_ = create_backbone("ViT-B-32", "openai", load_weights=False)
    acts = [
        type(b.mlp.gelu) for t in (clip.transformer, clip.visual.transformer) for b in t.resblocks
    ]
    assert acts and all(a is QuickGELU for a in acts)
    plain, *_ = create_backbone("ViT-B-32", None)
    assert not uses_quick_gelu(plain)


def test_quick_gelu_mismatch_is_an_error_not_a_warning():
    with pytest.raises(
        UserError,
        match="QuickGELU mismatch.*model.quick_gelu says quick_gelu=False.*"
        "pretrained tag 'openai' says quick_gelu=True",
    ):
        create_backbone("ViT-B-32", "openai", quick_gelu=False, load_weights=False)
    with pytest.raises(UserError, match="ma-tiny-hf architecture config says quick_gelu=True"):
        create_backbone("ma-tiny-hf", None, quick_gelu=False)


def test_build_model_records_the_activation_in_the_config():
    mcfg = tiny_model_cfg(backbone="ma-tiny-hf")
    build_model(mcfg)
    assert mcfg.quick_gelu is True
    model, *_ = build_model(tiny_model_cfg(backbone="ma-tiny-hf", pretrained=None, quick_gelu=True))
    assert uses_quick_gelu(model.clip)


def test_max_length_truncates_like_hf_and_keeps_embeddings_of_short_prompts():
    model, _, _, full = build_model(tiny_model_cfg(backbone="ma-tiny-vit"))
    _, _, _, cut = build_model(tiny_model_cfg(backbone="ma-tiny-vit", max_length=6))
    long, short = "a photo of a very large grey rhinoceros.", "a cat"
    plain = full([long, short])
    tokens = cut([long, short])
    assert tokens.shape == plain.shape == (2, 16)  # padded back to the context length
    eot = plain[1].max()
    assert (
        tokens[0, :5].tolist() == plain[0, :5].tolist()
        and tokens[0, 5] == eot
        and not tokens[0, 6:].any()
    )
    assert torch.equal(tokens[1], plain[1])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens[1:]), model.encode_text(plain[1:]))
    with pytest.raises(UserError, match="model.max_length=40.*from 2 to 16"):
        build_model(tiny_model_cfg(backbone="ma-tiny-vit", max_length=40))


def test_torchscript_weight_file_is_loaded_with_quick_gelu(tmp_path):
    scripted = open_clip.create_model(
        "ma-tiny-vit", jit=True
    )  # the form of OpenAI's released files
    torch.jit.save(scripted, tmp_path / "ViT-tiny.pt")
    clip, *_ = create_backbone("ma-tiny-vit", str(tmp_path / "ViT-tiny.pt"))
    assert uses_quick_gelu(clip)
    saved = scripted.state_dict()
    for name, value in clip.state_dict().items():
        assert torch.equal(saved[name], value), name
