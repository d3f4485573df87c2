"""Tiny generators covering every supported weight module, for the engine tests.

- ``EqualizedGAN``: ProGAN-like, equalized-lr convs (unit-scale weight, run-time gain).
- ``PlainGAN``: default-initialised nn.Linear, nn.ConvTranspose2d and nn.Conv2d.
- ``StyleGAN2Like``: mapping network, constant input and modulated convolutions
  with demodulation, following the protocol documented in rewriting/layers.py.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class EqualConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, padding=0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, in_features, out_features, bias_init=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = 1 / math.sqrt(in_features)

    def forward(self, x):
        return F.linear(x, self.weight * self.weight_gain, self.bias)


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualBlock(nn.Module):
    """conv -> LeakyReLU -> PixelNorm, as in the demo generator's layerN."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = EqualConv2d(in_channels, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.norm = PixelNorm()

    def forward(self, x):
        return self.norm(self.act(self.conv(x)))


class Upsample(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


class EqualizedGAN(nn.Module):
    def __init__(self, z_dim=16, channels=8):
        super().__init__()
        self.z_dim = z_dim
        self.channels = channels
        self.fc = EqualLinear(z_dim, channels * 16)
        self.layer1 = EqualBlock(channels, channels)
        self.up1 = Upsample()
        self.layer2 = EqualBlock(channels, channels)
        self.layer3 = EqualBlock(channels, channels)
        self.up2 = Upsample()
        self.layer4 = EqualBlock(channels, channels)
        self.to_rgb = EqualConv2d(channels, 3, 1)

    def forward(self, z):
        x = self.fc(z).view(-1, self.channels, 4, 4)
        x = self.layer1(x)
        x = self.layer3(self.layer2(self.up1(x)))
        x = self.layer4(self.up2(x))
        return torch.tanh(self.to_rgb(x))


class PlainGAN(nn.Module):
    """Default PyTorch initialisation everywhere (no equalized learning rate)."""

    def __init__(self, z_dim=16, channels=8):
        super().__init__()
        self.z_dim = z_dim
        self.channels = channels
        self.fc = nn.Linear(z_dim, channels * 16)
        self.deconv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)  # 4 -> 8
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.to_rgb = nn.Conv2d(channels, 3, 1)

    def forward(self, z):
        x = F.relu(self.fc(z)).view(-1, self.channels, 4, 4)
        x = F.relu(self.deconv(x))
        x = F.relu(self.conv(x))
        return torch.tanh(self.to_rgb(x))


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated conv: weight scaled per input channel by a style, then demodulated."""

    def __init__(self, in_channels, out_channels, kernel_size, w_dim, demodulate=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.demodulate = demodulate
        self.padding = kernel_size // 2

    def input_styles(self, x, w):
        return self.affine(w)

    def forward(self, x, w):
        n, c, h, width = x.shape
        s = self.input_styles(x, w)
        weight = self.weight[None] * self.weight_gain * s[:, None, :, None, None]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        out = F.conv2d(x.reshape(1, n * c, h, width), weight.reshape(-1, c, *weight.shape[3:]),
                       padding=self.padding, groups=n)
        return out.reshape(n, -1, h, width)


class StyledBlock(nn.Module):
    def __init__(self, in_channels, out_channels, w_dim, demodulate=True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, demodulate)
        self.bias = nn.Parameter(torch.zeros(out_channels, 1, 1))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x, w):
        return self.act(self.conv(x, w) + self.bias)


class StyleGAN2Like(nn.Module):
    def __init__(self, z_dim=16, w_dim=16, channels=8, demodulate=True):
        super().__init__()
        self.z_dim = z_dim
        self.mapping = nn.Sequential(EqualLinear(z_dim, w_dim), nn.LeakyReLU(0.2),
                                     EqualLinear(w_dim, w_dim), nn.LeakyReLU(0.2))
        self.const = nn.Parameter(torch.randn(1, channels, 4, 4))
        self.layer1 = StyledBlock(channels, channels, w_dim, demodulate)
        self.up = Upsample()
        self.layer2 = StyledBlock(channels, channels, w_dim, demodulate)
        self.to_rgb = nn.Conv2d(channels, 3, 1)

    def forward(self, z):
        w = self.mapping(z)
        x = self.const.expand(z.shape[0], -1, -1, -1)
        x = self.layer2(self.up(self.layer1(x, w)), w)
        return torch.tanh(self.to_rgb(x))


def build(name, seed=0, **config):
    torch.manual_seed(seed)
    model = {"equalized": EqualizedGAN, "plain": PlainGAN, "stylegan2": StyleGAN2Like}[name](**config)
    return model.eval().requires_grad_(False)
