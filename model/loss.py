"""The modality-aware loss (DESIGN section 5): contrastive, semantic-centre, reconstruction,
discriminator and orthogonality terms, ratio-normalised."""

import torch
import torch.nn.functional as F

from model.instance_loss import instance_triplet, patch_shuffle_triplet, triplets

LOSS_NAMES = ("clip", "sem", "rec", "disc", "orth")


def cos_emb(a, b):
    """Cosine-embedding loss with target +1: mean of (1 - cos)."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


class ModalityAwareLoss:
    """The total loss of a batch, as open_clip's ClipLoss holds what its distributed form needs:
    the ratios (name -> r; a loss whose ratio is 0 is not computed) and the gather of all ranks'
    features for the contrastive term (None on one process)."""

    def __init__(
        self,
        ratios,
        gather=None,
        fg_ratio=0.0,
        fg_margin=0.3,
        fg_shuffle_ratio=0.0,
        fg_categorical_ratio=1.0,
    ):
        self.ratios = {
            k: float(ratios.get(k, 0)) for k in LOSS_NAMES if float(ratios.get(k, 0)) > 0
        }
        if not self.ratios:
            raise ValueError("every loss ratio is 0: set at least one model.*_loss_ratio > 0.")
        self.gather = gather
        self.fg_ratio, self.fg_margin = float(fg_ratio), float(fg_margin)
        self.fg_shuffle_ratio = float(fg_shuffle_ratio)
        self.fg_categorical_ratio = float(fg_categorical_ratio)
        self.fg_hard = True  # batch-hard negatives; False: batch-all (train.fg_hard_from_epoch)

    def __call__(self, model, z_img, z_txt, image_mode, text_mode, fg=None):
        """(total, losses) of L2-normalised z_img, z_txt [B, d] whose rows have the modes image_mode
        (0 photo, 1 sketch) and text_mode (3 text): index.csv's m1 and m2. fg (fine-grained
        training): dict(instance=, labels=, images=) of the batch; the instance losses are added
        with weights train.fg_ratio and train.fg_shuffle_ratio to the ratio-normalised total,
        which then weighs train.fg_categorical_ratio."""
        active, m, losses = self.ratios, model.modes.weight, {}
        e_s = F.normalize((z_txt + z_img) / 2, dim=-1)
        if "clip" in active:
            losses["clip"] = self.contrastive(model.clip.logit_scale.exp(), z_img, z_txt)
        if "sem" in active:
            s_img, s_txt = z_img - m[image_mode], z_txt - m[text_mode]
            losses["sem"] = cos_emb(F.normalize(s_txt, dim=-1), e_s) + cos_emb(
                F.normalize(s_img, dim=-1), e_s
            )
        conv_img, conv_txt = model.convert(z_img, image_mode), model.convert(z_txt, text_mode)
        rows = torch.arange(z_img.shape[0], device=z_img.device)
        if "rec" in active:
            losses["rec"] = cos_emb(conv_txt[rows, image_mode], z_img) + cos_emb(
                conv_img[rows, text_mode], z_txt
            )
        if "disc" in active:
            k = torch.arange(model.n_mode, device=z_img.device).expand(z_img.shape[0], -1)
            side = []
            for conv, src in ((conv_txt, text_mode), (conv_img, image_mode)):
                keep = k != src[:, None]
                side.append(F.cross_entropy(model.disc(conv[keep]), k[keep]))
            losses["disc"] = (side[0] + side[1]) / 2
        if "orth" in active:
            losses["orth"] = (e_s[:, None, :] * m[None]).abs().sum(-1).mean()
        total = sum(active[k] * losses[k] for k in active) / sum(active.values())
        if fg is not None and (self.fg_ratio > 0 or self.fg_shuffle_ratio > 0):
            anchors, positives, negatives = triplets(fg["instance"], fg["labels"], image_mode)
            total = self.fg_categorical_ratio * total
            if self.fg_ratio > 0:
                losses["fg"] = instance_triplet(
                    z_img, anchors, positives, negatives, self.fg_margin, self.fg_hard
                )
                total = total + self.fg_ratio * losses["fg"]
            if self.fg_shuffle_ratio > 0:
                losses["fg_shuffle"] = patch_shuffle_triplet(
                    model.encode_image, fg["images"], anchors, positives, self.fg_margin
                )
                total = total + self.fg_shuffle_ratio * losses["fg_shuffle"]
        return total, losses

    def contrastive(self, scale, z_img, z_txt):
        """CLIP's symmetric cross-entropy; each row's own pair is the positive, every other row of
        the (global) batch a negative, same-class rows included, as the authors."""
        all_img, all_txt, offset = self.gather(z_img, z_txt) if self.gather else (z_img, z_txt, 0)
        labels = torch.arange(z_img.shape[0], device=z_img.device) + offset
        return (
            F.cross_entropy(scale * z_img @ all_txt.T, labels)
            + F.cross_entropy(scale * z_txt @ all_img.T, labels)
        ) / 2
