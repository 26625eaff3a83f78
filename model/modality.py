"""The modality-aware model (DESIGN section 5): a CLIP dual encoder whose embeddings split into
a modality-agnostic semantic part and learned modality vectors, with its five losses."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.runtime import UserError

LOSS_NAMES = ("clip", "sem", "rec", "disc", "orth")


def cos_emb(a, b):
    """Cosine-embedding loss with target +1: mean of (1 - cos)."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


class ModalityAwareCLIP(nn.Module):
    def __init__(self, clip, embed_dim, n_mode=4, temperature=2.6592):
        super().__init__()
        if not isinstance(getattr(clip, "logit_scale", None), nn.Parameter):
            raise UserError(f"the backbone ({type(clip).__name__}) has no logit_scale parameter, which the "
                            f"CLIP loss trains (reset to model.temperature); use an open_clip CLIP model.")
        self.clip = clip
        with torch.no_grad():  # the CLIP model's own scale, reset as the authors do, trained with the backbone
            clip.logit_scale.fill_(float(temperature))
        clip.logit_scale.requires_grad_(True)
        if isinstance(getattr(clip, "logit_bias", None), nn.Parameter):  # SigLIP's; unused here
            clip.logit_bias.requires_grad_(False)
        self.n_mode = n_mode
        self.modes = nn.Embedding(n_mode, embed_dim)  # PyTorch's default init N(0, 1), as the authors'
        self.disc = nn.Linear(embed_dim, n_mode)
        self.register_load_state_dict_pre_hook(_older_scale_name)

    def encode_image(self, images):
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def encode_text(self, tokens):
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    def convert(self, z, mode):
        """normalize(z - m_mode + m_k) for every mode k: [B, n_mode, d]."""
        m = self.modes.weight
        return F.normalize((z - m[mode])[:, None, :] + m[None], dim=-1)

    def forward(self, images, tokens, prompt_id, m1, m2, ratios, gather=None):
        """Encode a batch (each distinct prompt once) and return (total, losses)."""
        unique, inverse = torch.unique(prompt_id, return_inverse=True)
        z_img = self.encode_image(images)
        z_txt = self.encode_text(tokens[unique])[inverse]
        return compute_losses(self, z_img, z_txt, m1, m2, ratios, gather)


def _older_scale_name(module, state, prefix, *args):
    """Checkpoints written before the scale moved into the CLIP model kept the trained one as
    `logit_scale` (beside open_clip's unused, frozen one)."""
    if prefix + "logit_scale" in state:
        state[prefix + "clip.logit_scale"] = state.pop(prefix + "logit_scale")


def compute_losses(model, z_img, z_txt, m1, m2, ratios, gather=None):
    """All five losses and the ratio-normalised total.

    z_img, z_txt: [B, d] L2-normalised; m1, m2: [B] image and text modes; ratios: name -> r.
    gather: optional fn (z_img, z_txt) -> all ranks' features for the contrastive loss.
    Losses whose ratio is 0 are not computed.
    """
    m = model.modes.weight
    active = {k: float(ratios.get(k, 0)) for k in LOSS_NAMES if float(ratios.get(k, 0)) > 0}
    if not active:
        raise ValueError("every loss ratio is 0: set at least one model.*_loss_ratio > 0.")
    losses = {}
    e_s = F.normalize((z_txt + z_img) / 2, dim=-1)
    s_img, s_txt = z_img - m[m1], z_txt - m[m2]
    if "clip" in active:
        all_img, all_txt = gather(z_img, z_txt) if gather else (z_img, z_txt)
        scale = model.clip.logit_scale.exp()
        offset = 0 if gather is None else getattr(gather, "offset", 0)
        labels = torch.arange(z_img.shape[0], device=z_img.device) + offset
        losses["clip"] = (F.cross_entropy(scale * z_img @ all_txt.T, labels)
                          + F.cross_entropy(scale * z_txt @ all_img.T, labels)) / 2
    if "sem" in active:
        losses["sem"] = cos_emb(F.normalize(s_txt, dim=-1), e_s) + cos_emb(F.normalize(s_img, dim=-1), e_s)
    conv_img = F.normalize(s_img[:, None, :] + m[None], dim=-1)
    conv_txt = F.normalize(s_txt[:, None, :] + m[None], dim=-1)
    rows = torch.arange(z_img.shape[0], device=z_img.device)
    if "rec" in active:
        losses["rec"] = cos_emb(conv_txt[rows, m1], z_img) + cos_emb(conv_img[rows, m2], z_txt)
    if "disc" in active:
        k = torch.arange(model.n_mode, device=z_img.device).expand(z_img.shape[0], -1)
        side = []
        for conv, src in ((conv_txt, m2), (conv_img, m1)):
            keep = k != src[:, None]
            side.append(F.cross_entropy(model.disc(conv[keep]), k[keep]))
        losses["disc"] = (side[0] + side[1]) / 2
    if "orth" in active:
        losses["orth"] = (e_s[:, None, :] * m[None]).abs().sum(-1).mean()
    total = sum(active[k] * losses[k] for k in active) / sum(active.values())
    return total, losses
