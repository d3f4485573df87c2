"""The demo generator: a small progressive-GAN-style network (trained all at once).

z -> ``fc`` (EqualLinear to a 4x4 map) -> ``layer1``, ``layer2`` at 4x4 -> ``up8`` ->
``layer3``, ``layer4`` at 8x8 -> ... -> ``torgb`` (1x1) -> tanh.

Each ``layerN`` is a block ``conv`` (3x3 EqualConv2d) -> LeakyReLU(0.2) -> PixelNorm whose
input and output share one resolution; upsampling lives in the ``upK`` modules between
blocks. That is the shape the rewriting engine edits: the keys of ``layerN`` are the
per-pixel inputs of ``layerN.conv``, its values are the block's output.

Equalized learning rate: every stored weight is unit-scale (initialized N(0, 1)) and
multiplied at run time by the float attribute ``weight_gain`` = sqrt(2) / sqrt(fan_in).
"""
import math
import torch
import torch.nn as nn
import torch.nn.functional as F


class EqualLinear(nn.Module):
    def __init__(self, in_features, out_features, gain=math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.weight_gain = gain / math.sqrt(in_features)

    def forward(self, x):
        return F.linear(x, self.weight * self.weight_gain, self.bias)


class EqualConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, gain=math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x):
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.padding)


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


class ConvBlock(nn.Module):
    """3x3 conv -> LeakyReLU(0.2) -> PixelNorm, at one resolution."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = EqualConv2d(in_channels, out_channels, 3)
        self.act = nn.LeakyReLU(0.2)
        self.norm = PixelNorm()

    def forward(self, x):
        return self.norm(self.act(self.conv(x)))


class Upsample(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Generator(nn.Module):
    def __init__(self, z_dim=128, resolution=64, channels=(256, 256, 128, 64, 32)):
        super().__init__()
        levels = int(math.log2(resolution)) - 1  # 4x4 .. resolution
        if 2 ** (levels + 1) != resolution or len(channels) < levels:
            raise ValueError(f"resolution {resolution} needs a power of two and {levels} channel counts")
        self.z_dim = z_dim
        self.resolution = resolution
        self.channels = list(channels[:levels])
        self.fc = EqualLinear(z_dim, self.channels[0] * 16, gain=math.sqrt(2) / 4)
        self.fc_act = nn.LeakyReLU(0.2)
        self.fc_norm = PixelNorm()
        # Modules registered in forward order, so named_modules() reads like the network.
        self.blocks = []
        c_in, n = self.channels[0], 1
        for level, c in enumerate(self.channels):
            if level > 0:  # e.g. up8: 4x4 -> 8x8
                self.add_module(f"up{4 * 2 ** level}", Upsample())
                self.blocks.append(f"up{4 * 2 ** level}")
            for _ in range(2):
                self.add_module(f"layer{n}", ConvBlock(c_in, c))
                self.blocks.append(f"layer{n}")
                c_in, n = c, n + 1
        self.torgb = EqualConv2d(c_in, 3, 1, gain=1.0)

    def forward(self, z):
        """Latents [N, z_dim] -> images [N, 3, R, R] in [-1, 1]."""
        z = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
        x = self.fc_norm(self.fc_act(self.fc(z).view(len(z), self.channels[0], 4, 4)))
        for name in self.blocks:
            x = getattr(self, name)(x)
        return torch.tanh(self.torgb(x))

    def layer_resolutions(self) -> dict:
        """{"layer1": 4, ...}: the feature map size of each block."""
        out, size = {}, 4
        for name in self.blocks:
            if name.startswith("up"):
                size *= 2
            else:
                out[name] = size
        return out
