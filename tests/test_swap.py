"""swap_attention on a model written the way users write them: document-style self-attention, an
RCAN channel-attention layer, an SE layer with Linear layers, and look-alikes that must be left alone."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from tolerances import assert_close_rel
from torch import nn

import attnsr


class DocSelfAttention(nn.Module):
    """The inpainting document's block, as users copy it."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv_q = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.conv_k = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.conv_v = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.conv_out = nn.Conv2d(out_channels, in_channels, 1, 1, 0)

    def forward(self, x):
        b, c, h, w = x.size()
        q = self.conv_q(x).view(b, -1, h * w)
        k = self.conv_k(x).view(b, -1, h * w)
        v = self.conv_v(x).view(b, -1, h * w)
        attn = F.softmax(torch.bmm(q.transpose(1, 2), k) / (c**0.5), dim=-1)
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, -1, h, w)
        return self.conv_out(out) + x


class NoResidualLookAlike(DocSelfAttention):
    """Same children, different function (no residual): must not be swapped."""

    def forward(self, x):
        return super().forward(x) - x


class RCANLayer(nn.Module):
    def __init__(self, channel, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(
            nn.Conv2d(channel, channel // reduction, 1, padding=0, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(channel // reduction, channel, 1, padding=0, bias=True),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.conv_du(self.avg_pool(x))


class SELayer(nn.Module):
    def __init__(self, channel, hidden):
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excite = nn.Sequential(nn.Linear(channel, hidden, bias=False), nn.ReLU(),
                                    nn.Linear(hidden, channel, bias=False), nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.excite(self.squeeze(x).view(b, c)).view(b, c, 1, 1)


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 12, 3, padding=1)
        self.body = nn.Sequential(DocSelfAttention(12, 8), nn.ReLU(), RCANLayer(12), SELayer(12, 5),
                                  NoResidualLookAlike(12, 12))
        self.tail = attnsr.CBAM(12, 4, backend="torch")

    def forward(self, x):
        return self.tail(self.body(self.head(x)))


def _outputs_and_grads(model, x):
    model.zero_grad()
    x = x.detach().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return [y, x.grad] + [p.grad.clone() for p in model.parameters()]


def test_swap_keeps_function_weights_and_checkpoints(caplog):
    torch.manual_seed(0)
    model = UserNet().to(DEVICE, torch.float64)
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 6, 7, device=DEVICE, dtype=torch.float64)
    before = _outputs_and_grads(model, x)

    with caplog.at_level(logging.INFO, logger="attnsr.swap"):
        assert attnsr.swap_attention(model, backend="triton") is model

    assert isinstance(model.body[0], attnsr.SelfAttention2d)
    assert isinstance(model.body[2], attnsr.ChannelAttention)
    assert isinstance(model.body[3], attnsr.ChannelAttention)
    assert isinstance(model.body[4], NoResidualLookAlike), "a look-alike with another function was swapped"
    assert model.tail.backend == "triton" and model.tail.channel.backend == "triton"
    assert [name for name, _, _ in model.attnsr_swapped] == ["body.0", "body.2", "body.3", "tail"]
    assert "body.0: DocSelfAttention -> SelfAttention2d" in caplog.text
    assert sum(p.numel() for p in model.parameters()) == n_params

    after = _outputs_and_grads(model, x)
    # the swap adopts the model's own modules: the parameters are the same, in the same order
    # (compared as one vector: the gradient of conv_k's bias is zero up to rounding, softmax being
    # invariant to a shift of every key's logit)
    assert len(after) == len(before)
    assert_close_rel(after[0], before[0], torch.float64, "output after swap")
    assert_close_rel(after[1], before[1], torch.float64, "d(input) after swap")
    flat = [torch.cat([g.flatten() for g in grads[2:]]) for grads in (after, before)]
    assert_close_rel(*flat, torch.float64, "parameter gradients after swap")

    # the checkpoint saved before the swap loads strictly after it
    model.load_state_dict(checkpoint)
    assert torch.equal(model.body[2].fc2.bias, checkpoint["body.2.conv_du.2.bias"])


def test_swap_to_torch_backend_and_unknown_backend():
    model = nn.Sequential(DocSelfAttention(6, 6))
    attnsr.swap_attention(model, backend="torch")
    assert model[0].backend == "torch"
    with pytest.raises(ValueError, match=r"backend must be one of"):
        attnsr.swap_attention(model, backend="fast")


def test_swap_leaves_unrecognised_models_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Linear(4, 4)))
    before = [type(m) for m in model.modules()]
    attnsr.swap_attention(model)
    assert [type(m) for m in model.modules()] == before
    assert model.attnsr_swapped == []


def _train_step(model, x, optimizer):
    optimizer.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_optimizer_built_before_the_swap_still_trains_the_model():
    """The swap keeps the model's Parameter objects: an optimizer built before it keeps training
    the tensors the model computes with (with copies, steps would update tensors no longer used)."""
    torch.manual_seed(0)
    model = UserNet().to(DEVICE, torch.float64)
    twin = copy.deepcopy(model)  # never swapped: the expected trajectory
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05)
    attnsr.swap_attention(model, backend="triton")
    assert [name for name, _, _ in model.attnsr_swapped] == ["body.0", "body.2", "body.3", "tail"]
    kept = [a is b for a, b in zip(model.parameters(), params)]
    assert len(kept) == len(params) and all(kept), f"parameters replaced by the swap: {kept}"
    x = torch.randn(2, 3, 6, 7, device=DEVICE, dtype=torch.float64)
    for step in range(2):
        loss, twin_loss = _train_step(model, x, optimizer), _train_step(twin, x, twin_optimizer)
        assert_close_rel(loss, twin_loss, torch.float64, f"loss at step {step}")
    with torch.no_grad():
        assert_close_rel(model(x), twin(x), torch.float64, "output after two steps")


def test_swap_keeps_eval_mode_and_frozen_parameters():
    model = UserNet().to(DEVICE, torch.float64)
    model.body[0].conv_q.requires_grad_(False)  # a frozen projection
    model.body[2].conv_du[0].weight.requires_grad_(False)
    model.eval()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attnsr.swap_attention(model, backend="torch")
    assert isinstance(model.body[0], attnsr.SelfAttention2d) and isinstance(model.body[2], attnsr.ChannelAttention)
    training = [name for name, m in model.named_modules() if m.training]
    assert training == [], f"modules in training mode after swapping an eval() model: {training}"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert all(any(p is f for p in model.parameters()) for f in frozen)
    assert not model.body[0].conv_q.weight.requires_grad and not model.body[2].fc1.weight.requires_grad
    # a model in train() with one block in eval(): that block's replacement comes back in eval()
    model = UserNet().to(DEVICE, torch.float64)
    model.body[3].eval()
    attnsr.swap_attention(model, backend="torch")
    assert model.body[0].training and model.body[2].training and not model.body[3].training


def test_state_dict_keys_of_a_swapped_self_attention_block_are_kept():
    block = nn.Sequential(DocSelfAttention(6, 4))
    keys = list(block.state_dict())
    attnsr.swap_attention(block, backend="torch")
    assert isinstance(block[0], attnsr.SelfAttention2d)
    assert list(block.state_dict()) == keys


class _Gate(nn.Module):
    """x · sigmoid(conv(x)): a gate per pixel and channel, written as a call."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class _Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class _Attend(nn.Module):
    """Attention handed to PyTorch's SDPA."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _CodePredictor(nn.Module):
    """A model whose own forward takes a softmax: the root is asked what it is too."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        return self.logits(x).softmax(dim=1)


def test_what_is_left_is_listed_with_what_it_is():
    """Look-alikes and unfused forms say what they are: an SE layer without hidden units (C → 0 → C:
    a constant gate; not swapped, no crash), an SE gate map without its product, a sigmoid gate of
    another form, PyTorch's nn.MultiheadAttention, a module calling SDPA, and the model's own forward
    (listed under the name ""); a swish activation (a sigmoid without parameters) is not listed."""
    model = _CodePredictor()
    model.body = nn.ModuleDict({
        "se0": RCANLayer(4, reduction=8),  # 4 // 8 = 0 hidden units
        "map": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 2, 1), nn.ReLU(), nn.Conv2d(2, 4, 1), nn.Sigmoid()),
        "gate": _Gate(4), "swish": _Swish(), "mha": nn.MultiheadAttention(8, 2), "attend": _Attend()})
    attnsr.swap_attention(model, backend="torch")
    assert model.attnsr_swapped == []
    reasons = {name: why for name, _, why in model.attnsr_left}
    assert set(reasons) == {"", "body.se0", "body.se0.conv_du", "body.map", "body.gate", "body.mha", "body.attend"}, \
        reasons
    assert reasons[""] == ("attention-like (a softmax in its forward) in a form this version does not recognise "
                           "(_CodePredictor): not fused")
    assert "hidden layer has no units (C → 0 → C" in reasons["body.se0"]
    assert reasons["body.map"].startswith("a squeeze-excitation channel attention with ReLU and Sigmoid that returns "
                                          "the gate alone (the product with x is taken by the module around it"), \
        reasons["body.map"]
    assert reasons["body.gate"].startswith("a sigmoid in its own forward (_Gate)")
    assert reasons["body.mha"].startswith("PyTorch's nn.MultiheadAttention")
    assert reasons["body.attend"].startswith("attention through PyTorch's scaled_dot_product_attention")
