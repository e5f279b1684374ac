"""Small configurations of the published SR architectures as spandrel builds them, shared by
test_spandrel.py and test_upscale_published.py (import after ``pytest.importorskip("spandrel")``).

Two blocks per stage (one plain, one shifted window) so that Triton's interpreter runs them in
seconds; head dims 10 (SwinIR-light's) and 6. spandrel recognises each from its state_dict keys:
SwinIR's img_size comes back from the shifted block's attn_mask (16 = 2 windows of 8), its upsampler
from the upsample keys; HAT's compress_ratio and squeeze_factor divide embed_dim exactly (12/3), its
img_size is not in the keys (spandrel takes 64; both exceed the window, so the blocks shift alike);
RCAN's rgb_range (255) and res_scale (1) are its defaults, which spandrel assumes.

DAT and RGT: three blocks (a plain rectangle-window block, a channel-attention (DAT) or RG-SA (RGT)
block, a shifted rectangle-window block), windows 4×8 and 8×4 (one half of the channels each, one
head per half: every head is a grid axis of the interpreter's work). embed_dim 64: their dynamic
position MLP is embed_dim/32 wide, and a LayerNorm over one unit makes the bias a constant. CRAFT,
whose SRWAB block holds the same two-half rectangle-window attention: embed_dim 64 for the same
reason, two heads a half.
"""

import torch
from spandrel.architectures.ATD import ATD
from spandrel.architectures.CRAFT import CRAFT
from spandrel.architectures.DAT import DAT
from spandrel.architectures.DRCT import DRCT
from spandrel.architectures.GRL import GRL
from spandrel.architectures.HAT import HAT
from spandrel.architectures.RCAN import RCAN
from spandrel.architectures.RealCUGAN import UpCunet2x
from spandrel.architectures.RGT import RGT
from spandrel.architectures.SCUNet import SCUNet
from spandrel.architectures.Swin2SR import Swin2SR
from spandrel.architectures.SwinIR import SwinIR
from spandrel.architectures.Uformer import Uformer

SWIN = dict(img_size=16, depths=[2], num_heads=[2], mlp_ratio=2.0, upscale=2)
RECT = dict(img_size=16, embed_dim=96, split_size=[4, 8], depth=[3], num_heads=[2], drop_path_rate=0.0, upscale=2)


def _hat(**changes):
    return HAT(**{**SWIN, **changes}, embed_dim=12, compress_ratio=3, squeeze_factor=3, overlap_ratio=0.5,
               drop_path_rate=0.0, upsampler="pixelshuffle")


ARCHS = {
    "SwinIR": lambda: SwinIR(**SWIN, embed_dim=20, window_size=8, upsampler="pixelshuffledirect"),
    "HAT": lambda: _hat(window_size=4),
    # HAT's own window (16: N = 256 tokens, shifted by 8; an img_size above the window, else HAT
    # drops the shift) on a 16×16 image: one window per block, four mask regions in the shifted one
    "HAT-w16": lambda: _hat(window_size=16, img_size=32),
    "DRCT": lambda: DRCT(**SWIN, embed_dim=12, window_size=4, gc=8, drop_path_rate=0.0, upsampler="pixelshuffle"),
    "Swin2SR": lambda: Swin2SR(**SWIN, embed_dim=12, window_size=4, upsampler="pixelshuffledirect"),
    "ATD": lambda: ATD(**SWIN, embed_dim=12, window_size=4, category_size=32, num_tokens=8, reducted_dim=4,
                       upsampler="pixelshuffledirect"),
    "RCAN": lambda: RCAN(scale=2, n_resgroups=1, n_resblocks=2, n_feats=16, reduction=4),
    # SCUNet (denoising, scale 1): its head dim is 32 and its convolution and transformer halves
    # split the channels, so 64 is its smallest width; two blocks (plain, shifted) in the first stage only
    "SCUNet": lambda: SCUNet(in_nc=3, config=[2, 0, 0, 0, 0, 0, 0], dim=64, input_resolution=64),
    # GRL: its Swin V2 window attention (table, index and mask passed in) and anchor stripe attention
    "GRL": lambda: GRL(img_size=16, embed_dim=16, depths=[2], num_heads_window=[2], num_heads_stripe=[2], window_size=4,
                       stripe_size=[4, 4], mlp_ratio=2.0, drop_path_rate=0.0, upscale=2,
                       upsampler="pixelshuffledirect"),
    # Real-CUGAN 2×: SE blocks written as calls (mean, 1×1 convs, ReLU, sigmoid in forward); fixed widths
    "RealCUGAN": lambda: UpCunet2x(),
    # Uformer (restoration, scale 1): a plain and a shifted block in the first and last stages
    "Uformer": lambda: Uformer(img_size=16, embed_dim=8, depths=[2, 1, 1, 1, 1, 1, 1, 1, 2], num_heads=[1] * 9,
                               win_size=4, drop_path_rate=0.0),
    "DAT": lambda: DAT(**RECT, expansion_factor=2.0, upsampler="pixelshuffledirect"),
    "RGT": lambda: RGT(**RECT, mlp_ratio=2.0),
    # CRAFT: a plain and a shifted SRWAB (4×8 and 8×4 windows, two heads a half, shifted by (2, 4) with no
    # mask) and one HFB; its position MLPs are embed_dim/32 wide, as DAT's and RGT's
    "CRAFT": lambda: CRAFT(window_size=8, embed_dim=64, depths=[1], num_heads=[4], split_size_0=4, split_size_1=8,
                           upscale=2),
}
# the image side (or H, W) each architecture is tested on (SCUNet pads its input to a multiple of 64
# by reflection; Real-CUGAN's U-Nets crop their borders). DAT and RGT zero-pad q, k, v to a multiple
# of 8: DAT's 12×16 to its training resolution 16×16 (its own mask buffers in the shifted block),
# RGT's 16×20 to 16×24 (Swin's mask, computed; RG-SA needs 16 pixels a side at inference); CRAFT pads its
# 7×15 image to 8×16 by reflection (a multiple of its window_size 8, which both rectangles divide)
IMAGE_SIZE = {"SCUNet": 64, "RealCUGAN": 24, "DAT": (12, 16), "RGT": (16, 20), "CRAFT": (7, 15)}


def build(arch: str, dtype=torch.float32, device="cpu"):
    """The architecture in eval mode (no stochastic depth; gradients still flow), its weights nudged
    off the published init (which zeroes some tables and biases) so that every term counts."""
    torch.manual_seed(0)
    model = ARCHS[arch]().to(device, dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
