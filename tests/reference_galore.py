"""A deliberately plain float64 GaLore, written from algorithms.md §4(b) line by line.

One matrix at a time, in the weight's layout, full ``torch.linalg.svd`` of the gradient at
steps 0, T, 2T, …: nothing shared with the package's implementation, so the two can be compared.
"""

import math

import torch


class ReferenceGaLore:
    def __init__(self, shape, lr, betas, eps, weight_decay, rank, update_proj_gap, scale, side):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.r, self.T, self.scale, self.side = rank, update_proj_gap, scale, side
        self.t = 0            # completed steps
        self.P = None         # left: m × r;  right: r × n
        self.M = self.V = None

    def step(self, W, g):
        if self.t % self.T == 0:                      # refresh: SVD of the current gradient
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
            self.P = U[:, : self.r] if self.side == "left" else Vh[: self.r, :]
        R = self.P.T @ g if self.side == "left" else g @ self.P.T
        if self.M is None:
            self.M, self.V = torch.zeros_like(R), torch.zeros_like(R)
        self.M = self.b1 * self.M + (1 - self.b1) * R     # not rotated at a refresh
        self.V = self.b2 * self.V + (1 - self.b2) * R * R
        self.t += 1
        step_size = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        N = self.M / (self.V.sqrt() + self.eps)
        back = self.P @ N if self.side == "left" else N @ self.P
        W = W - step_size * self.scale * back
        if self.wd > 0:                                   # decay after the update
            W = W - self.lr * self.wd * W
        return W
