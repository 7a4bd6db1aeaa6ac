"""The demo's built-in emoji teacher: it loads as a ComfyUI MODEL with its text encoder and pixel 'VAE',
and draws emoji-like images (a coloured subject on a white background) through stock nodes."""
import torch


def test_builtin_emoji_teacher_draws_emoji_on_white(host):
    nodes = host.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = nodes["RAPMEmojiDemoLoader"]().load()
        assert type(model.model.model_config).__name__ == "SD15" and model.model.latent_format.latent_channels == 3
        positive = nodes["CLIPTextEncode"]().encode(clip, "grinning face, twitter style")[0]
        negative = nodes["CLIPTextEncode"]().encode(clip, "")[0]
        assert positive[0][0].shape == (1, 16, 384) and positive[0][0][0, 12:].abs().sum() == 0  # zero padding
        latent = nodes["EmptyLatentImage"]().generate(256, 256, 2)[0]  # 32×32 after ÷8: the image itself
        out = nodes["RAPMSampler"]().sample(model, positive, negative, latent, 7, 12, 3.0)[0]
        images = nodes["VAEDecode"]().decode(vae, out)[0]
    assert images.shape == (2, 32, 32, 3)
    corners = torch.cat([images[:, :3, :3], images[:, :3, -3:], images[:, -3:, :3], images[:, -3:, -3:]], dim=1)
    centre = images[:, 12:20, 12:20]
    assert corners.mean() > 0.75  # white background
    assert (corners.mean() - centre.mean()) > 0.15  # a darker, coloured subject in the middle
    assert centre.std() > 0.05
