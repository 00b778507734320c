"""A deliberately plain float64 LDAdam, written from algorithms.md §1(b) line by line.

One matrix at a time, ``B_t`` formed explicitly, Householder QR, full SVD for the first
basis: nothing shared with the package's implementation, so the two can be compared.
"""

import torch


class ReferenceLDAdam:
    def __init__(self, shape, lr, betas, eps, weight_decay, rank, rho, error_feedback, side):
        m, n = shape
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.r, self.rho, self.ef, self.side = rank, rho, error_feedback, side
        self.k = 0
        self.e = torch.zeros(m, n, dtype=torch.float64)
        self.P = None          # left: m × r;  right: R, r × n
        self.M = self.V = None

    def _left(self, X):
        """Work in the left orientation: transpose for a right projection."""
        return X if self.side == "left" else X.T

    def step(self, W, g):
        b1, b2, k = self.b1, self.b2, self.k
        a = self._left(g + self.e)                           # 1
        P_prev = None if self.P is None else self._left(self.P)
        M = None if self.M is None else self._left(self.M)
        V = None if self.V is None else self._left(self.V)
        if k == 0:                                           # 2, k = 0
            U, _, _ = torch.linalg.svd(a, full_matrices=False)
            P = U[:, : self.r]
            r, c = self.r, a.shape[1]
            M, V, P_prev = torch.zeros(r, c, dtype=a.dtype), torch.zeros(r, c, dtype=a.dtype), torch.zeros_like(P)
        else:                                                # 2, warm power iteration
            B = self.rho * P_prev @ M / (1 - b1**k) + (1 - self.rho) * a
            P, _ = torch.linalg.qr(B @ (B.T @ P_prev))
        g_hat = P.T @ a                                      # 3
        C = P.T @ P_prev                                     # 4
        M_t = C @ M
        if self.ef:                                          # 5
            e = (a - P @ g_hat) + b1 / (1 - b1) * (P_prev @ M - P @ M_t)
        else:
            e = torch.zeros_like(a)
        if k >= 1:                                           # 6
            c1, c2 = 1 - b1**k, 1 - b2**k
            S = V / c2 - (M / c1) ** 2
            V_t = c2 * ((C * C) @ S + (M_t / c1) ** 2).abs()
        else:
            V_t = V
        M = b1 * M_t + (1 - b1) * g_hat                      # 7
        V = b2 * V_t + (1 - b2) * g_hat**2
        N = (M / (1 - b1 ** (k + 1))) / ((V / (1 - b2 ** (k + 1))).sqrt() + self.eps)
        W = (1 - self.lr * self.wd) * W - self.lr * self._left(P @ N)   # 8
        self.P, self.M, self.V = self._left(P), self._left(M), self._left(V)   # 9
        self.e = self._left(e)
        self.k += 1
        return W
