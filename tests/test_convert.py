"""The authors' checkpoints and HF CLIP weights, offline: a random QuickGELU HF CLIPModel shaped
like
ViT-B/32 (smaller: model_configs/ma-tiny-hf.json) saved as their code saves, converted, and compared
with HF's own features; files that must be refused, and pickled code that must never run."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, get_constant_schedule_with_warmup

from model.backbone import build_model, create_backbone
from model.checkpoint import load_checkpoint
from model.convert import convert, main
from pipeline.infer import infer
from pipeline.evaluate import evaluate
from tests.conftest import REPO, compose_cfg
from runtime.errors import UserError, run_cli

BACKBONE = "ma-tiny-hf"


def hf_clip(patch_size=32, seed=0):
    torch.manual_seed(seed)
    tower = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(
        text_config=dict(tower, max_position_embeddings=32),
        vision_config=dict(tower, image_size=64, patch_size=patch_size),
        projection_dim=32,
    )
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def hf():
    return hf_clip()


class Marker:
    """Unpickling this runs `code` with a plain unpickler: it writes the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def save_authors_checkpoint(path, clip, n_mode=4, extra=None):
    """The dict their train.py saves: epoch, model (ModalAwareModel names), optimizer, lr_sched."""
    torch.manual_seed(1)
    state = {f"encoder.clip.{k}": v for k, v in clip.state_dict().items()}
    for tower in ("text_model", "vision_model"):  # the buffer transformers 4.27 (theirs) saved
        n = clip.state_dict()[f"{tower}.embeddings.position_embedding.weight"].shape[0]
        state[f"encoder.clip.{tower}.embeddings.position_ids"] = torch.arange(n)[None]
    d = clip.config.projection_dim
    state.update(
        {
            "encoder.mode_embedding.weight": torch.randn(n_mode, d),
            "encoder.discriminator.weight": torch.randn(n_mode, d),
            "encoder.discriminator.bias": torch.randn(n_mode),
        }
    )
    params = [torch.nn.Parameter(v.clone()) for v in state.values() if v.is_floating_point()]
    optim = torch.optim.AdamW(params, lr=5e-3)
    sched = get_constant_schedule_with_warmup(optim, 10)  # a pickled scheduler object, as theirs
    torch.save(
        dict(epoch=7, model=state, optimizer=optim.state_dict(), lr_sched=sched, **(extra or {})),
        path,
    )
    return state


def overrides(demo_root):
    return ["dataset=demo", f"dataset.root={demo_root}", f"model.backbone={BACKBONE}"]


def features(out):
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def converted_model(run):
    ckpt = load_checkpoint(run / "model" / "best.pth")
    model, _, _, tokenizer = build_model(
        OmegaConf.create(dict(ckpt["config"]["model"], pretrained=None))
    )
    model.load_state_dict(ckpt["model"])
    return model.eval(), tokenizer, ckpt


@pytest.fixture(scope="module")
def converted(hf, demo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    state = save_authors_checkpoint(tmp / "best.pth", hf, extra=dict(note=Marker(tmp / "pwned")))
    run = convert(tmp / "best.pth", tmp / "run", overrides(demo_root))
    return run, state, tmp


def test_converted_embeddings_equal_hf_clip(hf, converted):
    run, _, _ = converted
    model, tokenizer, ckpt = converted_model(run)
    assert ckpt["epoch"] == 7 and ckpt["config"]["model"]["max_length"] == 30
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    long = (
        "a photo of a "
        + " and a ".join(["rhinoceros", "windmill", "giraffe", "helicopter"] * 3)
        + "."
    )
    tokens = tokenizer(["a photo of a bat.", "a photo of a cow.", long])
    assert tokens.shape == (3, 32) and tokens[2, 29] == tokens[0].max() and not tokens[2, 30:].any()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pixels),
            features(hf.get_image_features(pixel_values=pixels)),
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            model.encode_text(tokens),
            features(hf.get_text_features(input_ids=tokens)),
            atol=1e-5,
            rtol=0,
        )


def test_converted_vectors_use_their_mode_embedding(converted):
    run, state, _ = converted
    model, _, _ = converted_model(run)
    m = state["encoder.mode_embedding.weight"]
    torch.testing.assert_close(model.modes.weight, m)
    torch.testing.assert_close(model.disc.bias, state["encoder.discriminator.bias"])
    z = F.normalize(torch.randn(2, m.shape[1]), dim=-1)
    expect = F.normalize(z[:, None] - m[torch.tensor([1, 0])][:, None] + m[None], dim=-1)
    torch.testing.assert_close(model.convert(z, torch.tensor([1, 0])), expect)


def test_pickled_code_in_the_checkpoint_is_never_run(converted):
    _, _, tmp = converted
    assert (tmp / "run" / "model" / "best.pth").is_file()
    assert not (tmp / "pwned").exists()


def test_infer_and_evaluate_use_the_converted_run_unchanged(converted):
    run, _, _ = converted
    out = infer(
        compose_cfg("config-infer", [f"path={run}", "device=cpu", "num_workers=0", "batch_size=64"])
    )
    assert (out / "converted_logits.pt").is_file()
    result = evaluate(
        compose_cfg("config-eval", [f"path={run}", "eval.device=cpu", "eval.report.enabled=false"])
    )
    assert 0 <= result["mAP@all"][0] <= 1


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_plain_hf_clip_weights_work_as_model_pretrained(hf, tmp_path, name):
    path = tmp_path / name
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, path) if name.endswith(".safetensors") else torch.save(state, path)
    clip, *_ = create_backbone(BACKBONE, str(path))
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            F.normalize(clip.encode_image(pixels), dim=-1),
            features(hf.get_image_features(pixel_values=pixels)),
            atol=1e-5,
            rtol=0,
        )


def test_hf_weights_trained_with_gelu_do_not_fit_a_quick_gelu_architecture(hf, tmp_path):
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(
        '{"text_config": {"hidden_act": "gelu"}, "vision_config": {"hidden_act": "gelu"}}'
    )
    with pytest.raises(
        UserError,
        match="QuickGELU mismatch.*architecture config says quick_gelu=True.*HF CLIPModel",
    ):
        create_backbone(BACKBONE, str(tmp_path / "pytorch_model.bin"))


def refused(argv, capsys):
    """run_cli's outcome: exit code and the error lines the user sees."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    return exit_.value.code, [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")
    ]


@pytest.fixture(scope="module")
def bad_files(hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "random.pth").write_bytes(os.urandom(4096))
    save_authors_checkpoint(tmp / "whole.pth", hf)
    (tmp / "truncated.pth").write_bytes((tmp / "whole.pth").read_bytes()[:50_000])
    torch.save(create_backbone(BACKBONE)[0].state_dict(), tmp / "open_clip.pt")
    save_authors_checkpoint(tmp / "vit_b_16_like.pth", hf_clip(patch_size=16))
    save_authors_checkpoint(tmp / "three_modes.pth", hf, n_mode=3)
    return tmp


@pytest.mark.parametrize(
    "name,message",
    [
        ("random.pth", "random.pth is not a PyTorch checkpoint"),
        ("truncated.pth", "truncated.pth is not a PyTorch checkpoint"),
        ("open_clip.pt", "open_clip.pt holds an open_clip CLIP checkpoint.*model.pretrained"),
        (
            "vit_b_16_like.pth",
            "vit_b_16_like.pth holds a CLIP of another architecture.*visual.conv1.weight is "
            r"\[64, 3, 16, 16\] there, \[64, 3, 32, 32\]",
        ),
        (
            "three_modes.pth",
            r"three_modes.pth holds 3 mode vectors.*model.n_mode=4; pass model.n_mode=3",
        ),
    ],
)
def test_bad_checkpoint_is_one_error_line_and_leaves_no_run_folder(
    bad_files, demo_root, tmp_path, capsys, name, message
):
    code, errors = refused(
        [f"src={bad_files / name}", f"out={tmp_path / 'run'}", *overrides(demo_root)], capsys
    )
    assert code == 1 and len(errors) == 1
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_command_line_refuses_a_file_that_is_no_checkpoint(tmp_path):
    (tmp_path / "best.pth").write_bytes(b"not a checkpoint at all")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.convert",
            f"src={tmp_path / 'best.pth'}",
            f"out={tmp_path / 'run'}",
            "dataset=demo",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        line for line in proc.stderr.splitlines() if "best.pth is not a PyTorch checkpoint" in line
    ]
    assert not (tmp_path / "run").exists()


def test_their_older_key_and_last_pth_convert_to_last(hf, demo_root, tmp_path):
    state = save_authors_checkpoint(tmp_path / "ckpt.pth", hf)
    torch.save(dict(epoch=100, model_state_dict=state), tmp_path / "last.pth")  # their older format
    run = convert(tmp_path / "last.pth", tmp_path / "run", overrides(demo_root))
    assert sorted(p.name for p in (run / "model").iterdir()) == ["last.pth"]
    assert torch.equal(
        load_checkpoint(run / "model" / "last.pth")["model"]["modes.weight"],
        state["encoder.mode_embedding.weight"],
    )


def test_existing_output_folder_is_never_overwritten(converted, demo_root, capsys):
    run, _, tmp = converted
    before = (run / "config.yaml").read_text()
    code, errors = refused([f"src={tmp / 'best.pth'}", f"out={run}", *overrides(demo_root)], capsys)
    assert (
        code == 1 and "already exists" in errors[0] and (run / "config.yaml").read_text() == before
    )


def test_missing_src_or_out_says_how_to_call_it(tmp_path, capsys):
    code, errors = refused([f"src={tmp_path / 'best.pth'}"], capsys)
    assert code == 1 and "usage: python -m model.convert src=" in errors[0]
    code, errors = refused([f"src={tmp_path / 'best.pth'}", f"out={tmp_path / 'run'}"], capsys)
    assert code == 1 and "best.pth: no such file" in errors[0] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_conversion_benchmark_never_writes_into_a_users_folder(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "best.pth").write_text("mine")
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.convert", "--work", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0 and "holds files this benchmark did not write" in p.stderr
    assert sorted(os.listdir(work)) == ["best.pth"] and (work / "best.pth").read_text() == "mine"
