"""The modality-aware model (DESIGN section 5): a CLIP dual encoder whose embeddings split into
a modality-agnostic semantic part and learned modality vectors (its loss: model/loss.py)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.errors import UserError


class ModalityAwareCLIP(nn.Module):
    def __init__(self, clip, embed_dim, n_mode=4, temperature=2.6592):
        super().__init__()
        if not isinstance(getattr(clip, "logit_scale", None), nn.Parameter):
            raise UserError(
                f"the backbone ({type(clip).__name__}) has no logit_scale parameter, which the "
                f"CLIP loss trains (reset to model.temperature); use an open_clip CLIP model."
            )
        self.clip = clip
        with (
            torch.no_grad()
        ):  # the CLIP model's own scale, reset as the authors do, trained with the backbone
            clip.logit_scale.fill_(float(temperature))
        clip.logit_scale.requires_grad_(True)
        if isinstance(getattr(clip, "logit_bias", None), nn.Parameter):  # SigLIP's; unused here
            clip.logit_bias.requires_grad_(False)
        self.n_mode = n_mode
        self.modes = nn.Embedding(
            n_mode, embed_dim
        )  # PyTorch's default init N(0, 1), as the authors'
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

    def forward(self, images, tokens, prompt_id, image_mode, text_mode, loss, fg=None):
        """Encode a batch (each distinct prompt once) and return loss(...): (total, losses).
        image_mode / text_mode: each row's mode ids (index.csv's m1 / m2); fg: the batch's
        instance ids and labels for the fine-grained losses (model/instance_loss.py)."""
        unique, inverse = torch.unique(prompt_id, return_inverse=True)
        z_img = self.encode_image(images)
        z_txt = self.encode_text(tokens[unique])[inverse]
        if fg is None:
            return loss(self, z_img, z_txt, image_mode, text_mode)
        return loss(self, z_img, z_txt, image_mode, text_mode, fg=dict(fg, images=images))


def _older_scale_name(module, state, prefix, *args):
    """Checkpoints written before the scale moved into the CLIP model kept the trained one as
    `logit_scale` (beside open_clip's unused, frozen one)."""
    if prefix + "logit_scale" in state:
        state[prefix + "clip.logit_scale"] = state.pop(prefix + "logit_scale")
