"""The demo discriminator: the generator's mirror, used only by demo.train_generator.

fromrgb (1x1) -> two 3x3 convs and a 2x average pool per resolution -> at 4x4 a
minibatch-stddev channel, a 3x3 conv and two linear layers -> one logit per image.
Equalized learning rate like the generator; training adds an R1 penalty.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from demo.generator import EqualConv2d, EqualLinear


class Discriminator(nn.Module):
    def __init__(self, resolution=64, channels=(256, 256, 128, 64, 32)):
        super().__init__()
        levels = int(math.log2(resolution)) - 1
        channels = list(channels[:levels])[::-1]  # highest resolution first
        self.fromrgb = EqualConv2d(3, channels[0], 1)
        self.convs = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.convs.append(nn.ModuleList([EqualConv2d(c_in, c_in, 3), EqualConv2d(c_in, c_out, 3)]))
        c = channels[-1]
        self.final_conv = EqualConv2d(c + 1, c, 3)
        self.final_fc = EqualLinear(c * 16, c)
        self.out = EqualLinear(c, 1, gain=1.0)

    def forward(self, x):
        x = F.leaky_relu(self.fromrgb(x), 0.2)
        for conv_a, conv_b in self.convs:
            x = F.leaky_relu(conv_a(x), 0.2)
            x = F.leaky_relu(conv_b(x), 0.2)
            x = F.avg_pool2d(x, 2)
        # Minibatch standard deviation (groups of up to 4) as one extra channel: fights mode collapse.
        n, c, h, w = x.shape
        g = math.gcd(4, n)
        std = x.view(g, -1, c, h, w).std(0, unbiased=False).mean((1, 2, 3))  # [n / g]
        x = torch.cat([x, std.repeat(g).view(n, 1, 1, 1).expand(n, 1, h, w)], 1)
        x = F.leaky_relu(self.final_conv(x), 0.2)
        x = F.leaky_relu(self.final_fc(x.flatten(1)), 0.2)
        return self.out(x).squeeze(1)
