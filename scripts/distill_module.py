"""What the benchmark, the experiment and the tests share: the main script loaded as a module (the one
way all three run its real code), and the public transformer configs of the real SD3 models."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "run_onpolicy_distill_colab.py"


def load_distill():
    """The main script, imported as a module; registered in sys.modules, where dataclasses resolve annotations."""
    spec = importlib.util.spec_from_file_location("run_onpolicy_distill_colab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# The public transformer/config.json of each model (text length 77 CLIP + 256 T5 tokens, latent /8).
SD3_CONFIGS = {
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "tiny": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
                 pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,)),
}


def build_transformer(name: str, dtype, device, **overrides):
    """Random weights of a real architecture (SD3_CONFIGS, with overrides), made directly on the device (seconds)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = SD3Transformer2DModel.from_config({**SD3_CONFIGS[name], **overrides})
    return model.to(dtype)
