"""Tiny configurations of every architecture that spandrel 0.4.2 and spandrel_extra_arches 0.2.0
build, and of the variants their loaders build from a checkpoint's keys when those add or change
attention-like modules (another upsampler, GRL's local convolution branch, Uformer's modulators,
FeMaSR's low-quality stage, DDColor's single-scale decoder, Real-CUGAN's other scales; AdaCode's
low-quality stage only repeats the Swin layers its other stage has). Import after
``pytest.importorskip("spandrel_extra_arches")``.

Keys are ``"<architecture id>"`` or ``"<architecture id>:<variant>"``, the id as the registries
name it. Sizes are the smallest the constructors accept; some architectures fix their widths
(LaMa, MAT, Real-CUGAN, CodeFormer's VQGAN), and those are built as they are.
"""

import importlib

import torch

_SPANDREL = "spandrel.architectures."
_EXTRA = "spandrel_extra_arches.architectures."


def _cls(package: str, name: str):
    return getattr(importlib.import_module(package), name)


def _spandrel(arch: str, name: str | None = None):
    return _cls(_SPANDREL + arch, name or arch)


def _extra(arch: str, name: str | None = None):
    return _cls(_EXTRA + arch, name or arch)


_SWIN = dict(img_size=16, depths=[2], num_heads=[2], mlp_ratio=2.0, upscale=2)
_GRL = dict(img_size=16, embed_dim=16, depths=[2], num_heads_window=[2], num_heads_stripe=[2], window_size=4,
            stripe_size=[4, 4], mlp_ratio=2.0, drop_path_rate=0.0, upscale=2, upsampler="pixelshuffledirect")
_UFORMER = dict(img_size=16, embed_dim=8, depths=[1] * 9, num_heads=[1] * 9, win_size=4, drop_path_rate=0.0)
_FDAT = dict(embed_dim=16, num_groups=1, depth_per_group=2, num_heads=2, window_size=4, mid_dim=16, scale=2)
_CODEBOOK = dict(codebook_params=[[32, 16, 8]], gt_resolution=64)
_AURA = dict(dim=8, image_size=32, input_image_size=8, style_network=dict(dim_in=8, dim_out=16, depth=1),
             up_dim_mults=(1, 2, 4), down_dim_mults=(2, 4), full_attn=(False, False, True), attn_depths=(1, 1, 1),
             mid_attn_depth=1, self_attn_dim_head=8, self_attn_heads=2, resnet_block_groups=4)

BUILDS = {
    "ATD": lambda: _spandrel("ATD")(**_SWIN, embed_dim=12, window_size=4, category_size=32, num_tokens=8,
                                    reducted_dim=4, upsampler="pixelshuffledirect"),
    "AuraSR": lambda: _spandrel("AuraSR")(**_AURA),
    "AuraSR:no-flash": lambda: _spandrel("AuraSR")(**_AURA, flash_attn=False),
    "CRAFT": lambda: _spandrel("CRAFT")(window_size=8, embed_dim=32, depths=[1], num_heads=[2], split_size_0=2,
                                        split_size_1=4, upscale=2),
    "Compact": lambda: _spandrel("Compact")(num_feat=8, num_conv=2, upscale=2),
    "DAT": lambda: _spandrel("DAT")(img_size=16, embed_dim=64, split_size=[4, 8], depth=[2], num_heads=[2],
                                    drop_path_rate=0.0, upscale=2, expansion_factor=2.0,
                                    upsampler="pixelshuffledirect"),
    "DCTLSA": lambda: _spandrel("DCTLSA")(nf=10, num_modules=1, upscale=2, num_head=2),
    "DITN": lambda: _spandrel("DITN")(dim=12, ITL_blocks=1, SAL_blocks=1, UFONE_blocks=1, patch_size=4, upscale=2),
    "DRCT": lambda: _spandrel("DRCT")(**_SWIN, embed_dim=12, window_size=4, gc=8, drop_path_rate=0.0,
                                      upsampler="pixelshuffle"),
    "DRUNet": lambda: _spandrel("DRUNet")(nc=[8, 16, 32, 64], nb=1),
    "DnCNN": lambda: _spandrel("DnCNN")(nc=8, nb=3),
    "ESRGAN": lambda: _spandrel("ESRGAN")(num_filters=8, num_blocks=1, scale=2),
    "FBCNN": lambda: _spandrel("FBCNN")(nc=[8, 16, 32, 64], nb=1),
    "FDAT": lambda: _spandrel("FDAT")(**_FDAT, upsampler_type="lda"),
    "FDAT:pa_up": lambda: _spandrel("FDAT")(**_FDAT, upsampler_type="pa_up"),
    "FDAT:dysample": lambda: _spandrel("FDAT")(**_FDAT, upsampler_type="dysample"),
    "FFTformer": lambda: _spandrel("FFTformer")(dim=8, num_blocks=[1, 1, 1], num_refinement_blocks=1),
    "GFPGAN": lambda: _spandrel("GFPGAN")(out_size=64, num_style_feat=64, narrow=0.125),
    "GRL": lambda: _spandrel("GRL")(**_GRL),
    "GRL:local": lambda: _spandrel("GRL")(**{**_GRL, "embed_dim": 32}, local_connection=True),
    "HAT": lambda: _spandrel("HAT")(**_SWIN, window_size=4, embed_dim=12, compress_ratio=3, squeeze_factor=3,
                                    overlap_ratio=0.5, drop_path_rate=0.0, upsampler="pixelshuffle"),
    "HVICIDNet": lambda: _spandrel("HVICIDNet")(channels=[8, 8, 16, 32], heads=[1, 2, 4, 8]),
    "IPT": lambda: _spandrel("IPT")(patch_size=6, n_feats=16, num_heads=2, num_layers=1, scale=[2]),
    "KBNet": lambda: _spandrel("KBNet", "KBNet_s")(width=16, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 1],
                                                   dec_blk_nums=[1, 1, 1, 1]),
    "KBNet:l": lambda: _spandrel("KBNet", "KBNet_l")(num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                                     heads=[1, 1, 1, 1]),
    "LaMa": lambda: _spandrel("LaMa")(),
    "MMRealSR": lambda: _spandrel("MMRealSR")(num_in_ch=3, num_out_ch=3, scale=2, num_feat=8, num_block=1,
                                              num_grow_ch=8, num_feats=[8, 8, 8, 8], num_blocks=[1, 1, 1, 1]),
    "MixDehazeNet": lambda: _spandrel("MixDehazeNet")(embed_dims=[8, 16, 32, 16, 8], depths=[1, 1, 1, 1, 1]),
    "MoESR": lambda: _spandrel("MoESR")(dim=16, n_blocks=1, n_block=1, upsample_dim=16, scale=2),
    "MoESR:dysample": lambda: _spandrel("MoESR")(dim=16, n_blocks=1, n_block=1, upsample_dim=16, scale=2,
                                                 upsampler="dysample"),
    "MoSR": lambda: _spandrel("MoSR")(n_block=1, dim=16, upscale=2),
    "NAFNet": lambda: _spandrel("NAFNet")(width=8, middle_blk_num=1, enc_blk_nums=[1], dec_blk_nums=[1]),
    "OmniSR": lambda: _spandrel("OmniSR")(num_feat=16, window_size=4, up_scale=2),
    "PLKSR": lambda: _spandrel("PLKSR")(dim=16, n_blocks=1, upscaling_factor=2, kernel_size=7),
    "PLKSR:real": lambda: _spandrel("PLKSR", "RealPLKSR")(dim=16, n_blocks=1, upscaling_factor=2, kernel_size=7,
                                                          dysample=True),
    "RCAN": lambda: _spandrel("RCAN")(scale=2, n_resgroups=1, n_resblocks=2, n_feats=16, reduction=4),
    "RGT": lambda: _spandrel("RGT")(img_size=16, embed_dim=64, split_size=[4, 8], depth=[2], num_heads=[2],
                                    drop_path_rate=0.0, upscale=2, mlp_ratio=2.0),
    "RealCUGAN": lambda: _spandrel("RealCUGAN", "UpCunet2x")(),
    "RealCUGAN:fast": lambda: _spandrel("RealCUGAN", "UpCunet2x_fast")(),
    "RealCUGAN:3x": lambda: _spandrel("RealCUGAN", "UpCunet3x")(),
    "RealCUGAN:4x": lambda: _spandrel("RealCUGAN", "UpCunet4x")(),
    "RestoreFormer": lambda: _spandrel("RestoreFormer")(n_embed=16, embed_dim=8, ch=32, ch_mult=(1, 2),
                                                        num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                                                        z_channels=8, head_size=2),
    "RetinexFormer": lambda: _spandrel("RetinexFormer")(n_feat=8, stage=1, num_blocks=[1, 1, 1]),
    "SAFMN": lambda: _spandrel("SAFMN")(dim=8, n_blocks=1, upscaling_factor=2),
    "SAFMNBCIE": lambda: _spandrel("SAFMNBCIE")(dim=8, n_blocks=1, num_layers=1),
    "SCUNet": lambda: _spandrel("SCUNet")(in_nc=3, config=[2, 0, 0, 0, 0, 0, 0], dim=64, input_resolution=64),
    "SPAN": lambda: _spandrel("SPAN")(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2),
    "SeemoRe": lambda: _spandrel("SeemoRe")(num_experts=2, num_layers=1, embedding_dim=16, recursive=1, scale=2),
    "SwiftSRGAN": lambda: _spandrel("SwiftSRGAN")(num_channels=8, num_blocks=1, upscale_factor=2),
    "Swin2SR": lambda: _spandrel("Swin2SR")(**_SWIN, embed_dim=12, window_size=4, upsampler="pixelshuffledirect"),
    "SwinIR": lambda: _spandrel("SwinIR")(**_SWIN, embed_dim=12, window_size=4, upsampler="pixelshuffledirect"),
    "Uformer": lambda: _spandrel("Uformer")(**_UFORMER),
    "Uformer:modulators": lambda: _spandrel("Uformer")(**_UFORMER, modulator=True, cross_modulator=True,
                                                       token_mlp="mlp"),
    "AdaCode": lambda: _extra("AdaCode")(**_CODEBOOK),
    "CodeFormer": lambda: _extra("CodeFormer")(dim_embd=64, n_head=2, n_layers=1, codebook_size=32),
    "DDColor": lambda: _extra("DDColor")(encoder_name="convnext-t", input_size=(64, 64), nf=32, num_queries=8,
                                         dec_layers=1),
    "DDColor:single": lambda: _extra("DDColor")(encoder_name="convnext-t", decoder_name="SingleColorDecoder",
                                                input_size=(64, 64), nf=32, num_queries=8, dec_layers=1),
    "FeMaSR": lambda: _extra("FeMaSR")(**_CODEBOOK),
    "FeMaSR:LQ": lambda: _extra("FeMaSR")(**_CODEBOOK, LQ_stage=True, scale_factor=2),
    "M3SNet": lambda: _extra("M3SNet")(width=8, enc_blk_nums=[1, 1, 1, 1], dec_blk_nums=[1, 1, 1, 1]),
    "MAT": lambda: _extra("MAT")(),
    "MIRNet2": lambda: _extra("MIRNet2")(n_feat=16, n_MRB=1),
    "MPRNet": lambda: _extra("MPRNet")(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1),
    "Restormer": lambda: _extra("Restormer")(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                             heads=[1, 1, 1, 1]),
    "SRFormer": lambda: _extra("SRFormer")(**_SWIN, embed_dim=12, window_size=4, upsampler="pixelshuffledirect"),
}


def build(key: str, dtype=torch.float64):
    """The architecture ``key`` of :data:`BUILDS`, in ``dtype`` and eval mode, seeded."""
    torch.manual_seed(0)
    return BUILDS[key]().to(dtype).eval()
