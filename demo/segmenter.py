"""The demo segmenter: a small U-Net labelling each pixel as one of CLASSES.

enc1 (full size) -> pool -> enc2 (1/2) -> pool -> enc3 (1/4) -> up, + enc2 -> dec2 (1/2)
-> up, + enc1 -> dec1 (full size) -> head (1x1) -> logits [N, 6, H, W].

``feature_layer`` names the module whose output the edit metrics compare for the
"feature distance" part of unwanted change (a 1/2-resolution map that has seen
context from the 1/4 level, like a perceptual feature).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from demo.scenes import CLASSES


def conv_bn_relu(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def double_conv(c_in, c_out):
    return nn.Sequential(*conv_bn_relu(c_in, c_out), *conv_bn_relu(c_out, c_out))


class Segmenter(nn.Module):
    feature_layer = "dec2"
    classes = CLASSES

    def __init__(self, channels=(32, 64, 128)):
        super().__init__()
        c1, c2, c3 = channels
        self.enc1 = double_conv(3, c1)
        self.enc2 = double_conv(c1, c2)
        self.enc3 = double_conv(c2, c3)
        self.dec2 = double_conv(c3 + c2, c2)
        self.dec1 = double_conv(c2 + c1, c1)
        self.head = nn.Conv2d(c1, len(CLASSES), 1)

    def forward(self, images):
        """Images [N,3,H,W] in [-1,1] (H, W divisible by 4) -> logits [N, 6, H, W]."""
        e1 = self.enc1(images)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2, mode="bilinear"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2, mode="bilinear"), e1], 1))
        return self.head(d1)

    @torch.no_grad()
    def predict(self, images):
        """Class index per pixel, [N, H, W]."""
        return self(images).argmax(1)


def confusion(pred, labels, n_classes=len(CLASSES)):
    """Confusion counts [true, predicted] over all pixels."""
    idx = labels.flatten() * n_classes + pred.flatten()
    return torch.bincount(idx, minlength=n_classes * n_classes).view(n_classes, n_classes).cpu()


def iou_from_confusion(conf):
    """Per-class intersection over union, {class name: float}."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    return {name: round(float(inter[i] / union[i]), 4) if union[i] > 0 else None for i, name in enumerate(CLASSES)}
