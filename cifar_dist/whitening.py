"""The first convolution's filters from the training images: patch whitening (airbench).

For a first convolution with k x k filters over C channels, every k x k x C patch of a
subset of the training images is a vector of d = k*k*C numbers. With the eigenvectors v_i
and eigenvalues l_i of their (uncentred) second-moment matrix, the filters

    v_i / sqrt(l_i + eps)   and their negatives,   i = 1..d (largest eigenvalue first)

map each patch to its whitened coordinates (2d filters: the negatives keep what a ReLU or
GELU after the layer would cut). airbench94's 2x2 layer over 3 channels has exactly 2 x 12
= 24 filters; a wider layer (the seed's 64 3x3 filters: 2 x 27 = 54) keeps its random
initialisation in the filters beyond 2d.

The subset is chosen by the run's seed and the arithmetic is float64 numpy on the host,
so every worker computes the same filters, and a resume restores them from the checkpoint
anyway. The patches are taken as the layer sees them: after the network's own input
normalisation (airbench94's fixed CIFAR-10 mean and standard deviation).
"""

from __future__ import annotations

import numpy as np

SUBSET = 5000           # airbench: the whitening is estimated on 5,000 training images
EPSILON = 5e-4          # airbench's, on normalised images (mean eigenvalue about 1)


def patches(images: np.ndarray, size: int) -> np.ndarray:
    """float64 [N * (H-size+1) * (W-size+1), size*size*C]: every size x size patch, flattened
    in the order of a Keras kernel [kh, kw, in]."""
    n, h, w, c = images.shape
    windows = np.lib.stride_tricks.sliding_window_view(images, (size, size), axis=(1, 2))
    # [n, h', w', c, kh, kw] -> [n, h', w', kh, kw, c]
    windows = np.moveaxis(windows, 3, -1)
    return windows.reshape(-1, size * size * c).astype(np.float64)


def whitening_filters(images_u8: np.ndarray, size: int, *, seed: int,
                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                      subset: int = SUBSET, epsilon: float = EPSILON) -> np.ndarray:
    """float32 Keras kernel [size, size, C, 2 * size*size*C] whitening the patches of
    `subset` training images chosen by `seed` (the images as the layer sees them:
    (x / 255 - mean) / std).

    epsilon is relative to the mean eigenvalue (1 for normalised images, as airbench's), so
    a layer that sees unnormalised [0, 1] images is regularised alike.
    """
    rng = np.random.default_rng(seed)
    count = min(subset, len(images_u8))
    chosen = np.sort(rng.choice(len(images_u8), count, replace=False))
    x = (images_u8[chosen].astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    d = size * size * images_u8.shape[-1]
    covariance, total = np.zeros((d, d)), 0
    for start in range(0, count, 500):  # in chunks: all 3x3 patches at once would be 1 GB
        flat = patches(x[start:start + 500], size)
        covariance += flat.T @ flat
        total += len(flat)
    covariance /= total
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    # eigh's eigenvectors are defined up to sign: fix it (largest entry positive) so the
    # filters do not depend on the LAPACK build.
    signs = np.sign(eigenvectors[np.argmax(np.abs(eigenvectors), axis=0),
                                 np.arange(eigenvectors.shape[1])])
    eigenvectors = eigenvectors * np.where(signs == 0, 1.0, signs)
    scaled = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0)
                                    + epsilon * eigenvalues.mean())
    filters = np.concatenate([scaled, -scaled], axis=1)           # [d, 2d]
    channels = images_u8.shape[-1]
    return filters.reshape(size, size, channels, -1).astype(np.float32)
