"""The tiny random-weight Wan transformer of the diffusers tests (test_diffusers.py,
test_diffusers_parallel.py); needs torch and diffusers."""


def tiny_wan():
    import torch
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64,
                              in_channels=4, out_channels=4, text_dim=32, freq_dim=32,
                              ffn_dim=64, num_layers=2, cross_attn_norm=True,
                              qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    return m.eval()
