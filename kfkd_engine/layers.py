"""Lasagne's layers, by their names, as PyTorch modules: what the tutorial's nets are made of."""
import torch.nn.functional as F
from torch import nn


def _glorot(layer):
    # Lasagne's defaults: Glorot-uniform weights, zero biases.
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


class DenseLayer(nn.Linear):
    """Lasagne's DenseLayer: flattens its input, then affine, then ReLU.

    With nonlinearity=None it is linear, as the output layer is.
    """

    def __init__(self, in_features, num_units, nonlinearity=F.relu):
        super().__init__(in_features, num_units)
        self.nonlinearity = nonlinearity
        _glorot(self)

    def forward(self, x):
        x = super().forward(x.flatten(1))
        return x if self.nonlinearity is None else self.nonlinearity(x)


class Conv2DLayer(nn.Conv2d):
    """Lasagne's Conv2DLayer: a convolution, 'valid' (no padding) unless
    `pad` says otherwise, then ReLU (nonlinearity=None: none)."""

    def __init__(self, in_channels, num_filters, filter_size, nonlinearity=F.relu, stride=1,
                 pad=0):
        super().__init__(in_channels, num_filters, filter_size, stride, pad)
        self.nonlinearity = nonlinearity
        _glorot(self)

    def forward(self, x):
        x = super().forward(x)
        return x if self.nonlinearity is None else self.nonlinearity(x)


class DropoutLayer(nn.Dropout):
    """Lasagne's DropoutLayer: zeroes each input with probability `p` while
    training (scaling the rest by 1 / (1 - p)); passes inputs through otherwise."""


class MaxPool2DLayer(nn.MaxPool2d):
    """Max-pooling (2x2 unless `pool_size`) that also applies the ReLU of the
    conv layer before it.

    relu(max(x)) == max(relu(x)), in value and in gradient, so rectifying
    after the pool computes the same net while touching 4x fewer values.
    ConvNet's conv layers leave their ReLU to it.
    """

    def __init__(self, pool_size=2, stride=None, ceil_mode=False):
        super().__init__(pool_size, stride, ceil_mode=ceil_mode)

    def forward(self, x):
        return F.relu(super().forward(x))

