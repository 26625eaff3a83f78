"""Each loss against a hand computation on small fixed tensors."""

import math

import pytest
import torch
import torch.nn as nn

from model.loss import ModalityAwareLoss
from model.modality import ModalityAwareCLIP

D, K = 3, 4


def unit(v):
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.norm()


class ScaleOnly(nn.Module):
    """The part of a CLIP model the losses use: its logit scale (features are given directly)."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.ones([]))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = ModalityAwareCLIP(ScaleOnly(), D, n_mode=K, temperature=math.log(2.0)).double()
    with torch.no_grad():
        model.modes.weight.copy_(
            torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.3], [0.1, 0.1, 0.1]])
        )
        model.disc.weight.copy_(
            torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])
        )
        model.disc.bias.zero_()
    z_img = torch.stack([unit([1.0, 0.0, 0.0]), unit([0.0, 1.0, 1.0])])
    z_txt = torch.stack([unit([1.0, 1.0, 0.0]), unit([0.0, 0.0, 1.0])])
    m1 = torch.tensor([0, 1])
    m2 = torch.tensor([3, 3])
    return model, z_img, z_txt, m1, m2


def only(name):
    return {n: (1.0 if n == name else 0.0) for n in ("clip", "sem", "rec", "disc", "orth")}


def test_clip_loss_by_hand(setup):
    model, zi, zt, m1, m2 = setup
    total, losses = ModalityAwareLoss(only("clip"))(model, zi, zt, m1, m2)
    s = 2.0  # exp(log 2)
    # image->text logits row i: s * <zi_i, zt_j>
    r = 1 / math.sqrt(2)
    c = [[r, 0.0], [0.5, r]]  # cosines <zi_i, zt_j> of the unit vectors above

    def ce(logits, t):
        return -logits[t] + math.log(sum(math.exp(x) for x in logits))

    i2t = (ce([s * c[0][0], s * c[0][1]], 0) + ce([s * c[1][0], s * c[1][1]], 1)) / 2
    t2i = (ce([s * c[0][0], s * c[1][0]], 0) + ce([s * c[0][1], s * c[1][1]], 1)) / 2
    assert losses["clip"].item() == pytest.approx((i2t + t2i) / 2, abs=1e-8)  # scale held in fp32
    assert total.item() == pytest.approx(losses["clip"].item())
    assert set(losses) == {"clip"}


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_sem_loss_by_hand(setup):
    model, zi, zt, m1, m2 = setup
    m = model.modes.weight.detach()
    _, losses = ModalityAwareLoss(only("sem"))(model, zi, zt, m1, m2)
    expect = 0.0
    for b in range(2):
        e = (zi[b] + zt[b]) / 2
        expect += (1 - _cos(zt[b] - m[m2[b]], e)) / 2 + (1 - _cos(zi[b] - m[m1[b]], e)) / 2
    assert losses["sem"].item() == pytest.approx(expect, abs=1e-10)


def test_rec_loss_by_hand(setup):
    model, zi, zt, m1, m2 = setup
    m = model.modes.weight.detach()
    _, losses = ModalityAwareLoss(only("rec"))(model, zi, zt, m1, m2)
    expect = 0.0
    for b in range(2):
        conv_txt_to_img_mode = zt[b] - m[m2[b]] + m[m1[b]]
        conv_img_to_txt_mode = zi[b] - m[m1[b]] + m[m2[b]]
        expect += (1 - _cos(conv_txt_to_img_mode, zi[b])) / 2 + (
            1 - _cos(conv_img_to_txt_mode, zt[b])
        ) / 2
    assert losses["rec"].item() == pytest.approx(expect, abs=1e-10)


def test_disc_loss_by_hand(setup):
    model, zi, zt, m1, m2 = setup
    m = model.modes.weight.detach()
    W = model.disc.weight.detach()
    _, losses = ModalityAwareLoss(only("disc"))(model, zi, zt, m1, m2)

    def side(z, src):
        terms = []
        for b in range(2):
            for k in range(K):
                if k == src[b]:
                    continue
                v = z[b] - m[src[b]] + m[k]
                v = v / v.norm()
                logits = W @ v
                terms.append(-(logits[k] - torch.logsumexp(logits, 0)).item())
        return sum(terms) / len(terms)

    expect = (side(zt, m2) + side(zi, m1)) / 2
    assert losses["disc"].item() == pytest.approx(expect, abs=1e-10)


def test_orth_loss_by_hand(setup):
    model, zi, zt, m1, m2 = setup
    m = model.modes.weight.detach()
    _, losses = ModalityAwareLoss(only("orth"))(model, zi, zt, m1, m2)
    vals = []
    for b in range(2):
        e = (zi[b] + zt[b]) / 2
        e = e / e.norm()
        for k in range(K):
            vals.append(sum(abs(e[j] * m[k, j]).item() for j in range(D)))
    assert losses["orth"].item() == pytest.approx(sum(vals) / len(vals), abs=1e-10)


def test_total_is_ratio_normalised_and_zero_ratio_switches_off(setup):
    model, zi, zt, m1, m2 = setup
    ratios = dict(clip=1.0, sem=0.1, rec=0.02, disc=0.1, orth=0.0)
    total, losses = ModalityAwareLoss(ratios)(model, zi, zt, m1, m2)
    assert "orth" not in losses
    expect = (
        1.0 * losses["clip"] + 0.1 * losses["sem"] + 0.02 * losses["rec"] + 0.1 * losses["disc"]
    ) / 1.22
    assert total.item() == pytest.approx(expect.item(), abs=1e-12)
    ratios["orth"] = 0.5
    total2, losses2 = ModalityAwareLoss(ratios)(model, zi, zt, m1, m2)
    assert "orth" in losses2
    assert total2.item() == pytest.approx(
        ((expect * 1.22) + 0.5 * losses2["orth"]).item() / 1.72, abs=1e-12
    )
    with pytest.raises(ValueError):
        ModalityAwareLoss({k: 0.0 for k in ratios})(model, zi, zt, m1, m2)


def test_gradients_reach_mode_vectors_and_discriminator(setup):
    model, zi, zt, m1, m2 = setup
    total, _ = ModalityAwareLoss(dict(clip=1, sem=0.1, rec=0.02, disc=0.1, orth=0))(
        model, zi, zt, m1, m2
    )
    total.backward()
    assert model.modes.weight.grad.abs().sum() > 0
    assert model.disc.weight.grad.abs().sum() > 0
    assert model.clip.logit_scale.grad is not None


def test_orth_loss_sums_absolute_products_not_the_absolute_dot_product(setup):
    """With mixed signs, sum_j |E_s[b,j] m_k[j]| and its near misses |sum_j E_s[b,j] m_k[j]| and
    |<E_s, m_k>| over normalised vectors differ: only the first is the loss."""
    model, _, _, m1, m2 = setup
    with torch.no_grad():
        model.modes.weight.copy_(
            torch.tensor([[0.5, -0.5, 0.2], [-0.3, 0.4, 0.1], [0.2, 0.2, -0.6], [1.0, -1.0, 0.0]])
        )
    zi = torch.stack([unit([1.0, 1.0, 0.0]), unit([1.0, -2.0, 1.0])])
    zt = torch.stack([unit([1.0, 1.0, 0.2]), unit([1.0, -2.0, 0.8])])
    _, losses = ModalityAwareLoss(only("orth"))(model, zi, zt, m1, m2)
    e = torch.nn.functional.normalize((zi + zt) / 2, dim=-1)
    m = model.modes.weight.detach()
    right = sum(
        sum(abs(e[b, j] * m[k, j]) for j in range(D)) for b in range(2) for k in range(K)
    ) / (2 * K)
    near_miss = sum(
        abs(sum(e[b, j] * m[k, j] for j in range(D))) for b in range(2) for k in range(K)
    ) / (2 * K)
    assert abs(right - near_miss) > 0.1
    assert losses["orth"].item() == pytest.approx(right.item(), abs=1e-12)


def test_fine_grained_total_weighs_the_categorical_and_instance_terms(setup):
    """total = fg_categorical_ratio * (ratio-normalised categorical loss) + fg_ratio * triplet."""
    model = setup[0]
    # rows: photo A (instance 0), the sketch drawn from A, photo B (1) of the same class
    zi = torch.stack([unit([1.0, 0.0, 0.0]), unit([0.8, 0.6, 0.0]), unit([0.6, 0.8, 0.0])])
    zt = torch.stack([unit([1.0, 1.0, 0.0]), unit([1.0, 1.0, 0.0]), unit([0.0, 0.0, 1.0])])
    m1, m2 = torch.tensor([0, 1, 0]), torch.tensor([3, 3, 3])
    ratios = dict(clip=1.0, sem=0.1, rec=0.02, disc=0.1, orth=0.0)
    categorical, _ = ModalityAwareLoss(ratios)(model, zi, zt, m1, m2)
    fg = dict(instance=torch.tensor([0, 0, 1]), labels=torch.tensor([1, 1, 1]))
    # d(sketch, A) = 1 - 0.8 = 0.2, d(sketch, B) = 1 - 0.96 = 0.04: relu(0.2 - 0.04 + 0.3) = 0.46
    for cat_ratio in (1.0, 0.25, 0.0):
        total, losses = ModalityAwareLoss(ratios, fg_ratio=2.0, fg_categorical_ratio=cat_ratio)(
            model, zi, zt, m1, m2, fg
        )
        assert losses["fg"].item() == pytest.approx(0.46, abs=1e-12)
        expect = cat_ratio * categorical.item() + 2.0 * 0.46
        assert total.item() == pytest.approx(expect, abs=1e-12)
