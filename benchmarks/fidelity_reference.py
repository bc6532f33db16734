"""An independent reference of the SDML authors' training loop, in plain PyTorch.

Written from the paper (Hu et al., SIGIR 2019) and the authors' recipe, sharing no code with
sdml_ext: its only inputs are numpy arrays, so both implementations can be fed the same data.

    per modality i:  h = normalize(f_i(x)),  x_hat = normalize(g_i(h))
    loss = lam * mean_rows ||x_hat - x||_2 + (1 - lam) * mean_labelled_rows ||P^T h - y||_2
    Adam(betas=(0.5, 0.999)), lr 1e-4 for the first modality and 2e-4 for the others,
    batches of 100 (last incomplete one dropped), reshuffled every epoch, P fixed with
    orthonormal columns (QR of a seeded Gaussian); the encoder of the epoch with the lowest
    validation supervised loss is kept. Evaluation: cosine similarity, mAP@all over every ordered
    pair of modalities, with a float64 sort-based AP (ties broken by ascending gallery index).

Every piece is a plain function with the obvious default, so a fidelity study can swap one piece
at a time (another optimizer, loss, network, P or batch order) and see what moves.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

CODE_DIM = 512
HIDDEN = 1024
LAM = 0.5
BETAS = (0.5, 0.999)
LRS = (1e-4, 2e-4)  # first modality, every later one
BATCH = 100


def make_P(d: int, c: int, seed: int) -> torch.Tensor:
    """[d, c] float32 with orthonormal columns: Q of the QR of a seeded Gaussian."""
    g = torch.Generator().manual_seed(10_007 + int(seed))
    q, _ = torch.linalg.qr(torch.randn(d, c, generator=g, dtype=torch.float64))
    return q.float()


class Autoencoder(nn.Module):
    """D -> 1024 -> 1024 -> d (code, L2-normalised) -> 1024 -> 1024 -> D (L2-normalised)."""

    def __init__(self, dim: int, code: int = CODE_DIM, hidden: int = HIDDEN):
        super().__init__()
        self.enc1, self.enc2, self.enc3 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, code)
        self.dec1, self.dec2, self.dec3 = nn.Linear(code, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, dim)

    def encode(self, x):
        h = self.enc3(torch.relu(self.enc2(torch.relu(self.enc1(x)))))
        return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x):
        h = self.encode(x)
        out = self.dec3(torch.relu(self.dec2(torch.relu(self.dec1(h)))))
        return h, out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def encoder_state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith("enc")}


def one_hot(labels: np.ndarray, c: int) -> torch.Tensor:
    """[n] class ids (-1 = unlabelled) or [n, c] rows -> [n, c] float32 (all-zero = unlabelled)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return torch.from_numpy(labels.astype(np.float32))
    out = torch.zeros(len(labels), c)
    keep = labels >= 0
    out[torch.from_numpy(np.flatnonzero(keep)), torch.from_numpy(labels[keep].astype(np.int64))] = 1.0
    return out


def eager_loss(x_hat, x, h, P, y, lam: float = LAM):
    """(loss, rec, sup): plain Euclidean norms per row; sup averaged over labelled rows only."""
    rec = torch.linalg.vector_norm(x_hat - x, dim=1)
    sup = torch.linalg.vector_norm(h @ P - y, dim=1)
    labelled = y.sum(dim=1) > 0
    rec_mean = rec.mean()
    sup_mean = sup[labelled].mean() if bool(labelled.any()) else rec.new_zeros(())
    return lam * rec_mean + (1 - lam) * sup_mean, rec_mean, sup_mean


def adam(params, lr: float):
    return torch.optim.Adam(params, lr=lr, betas=BETAS)


@dataclass
class ModalityRun:
    best_epoch: int
    best_val_sup: float
    val_sup: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    encoder: dict | None = None


def train_modality(
    x: np.ndarray,
    y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    P: torch.Tensor,
    lr: float,
    seed: int,
    epochs: int,
    batch: int = BATCH,
    lam: float = LAM,
    *,
    make_model: Callable[[int], nn.Module] = Autoencoder,
    make_optimizer: Callable = adam,
    loss_fn: Callable = eager_loss,
    order: Callable[[int, int], np.ndarray] | None = None,
    model: nn.Module | None = None,
) -> tuple[nn.Module, ModalityRun]:
    """Train one modality's autoencoder against P; returns the net (with the kept encoder loaded)
    and the record. ``order(epoch, n)`` gives an epoch's sample order (default: a permutation
    from numpy's generator seeded with ``seed``); ``model`` replaces the freshly built one."""
    c = P.shape[1]
    X, Y = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), one_hot(y, c)
    VX, VY = torch.from_numpy(np.ascontiguousarray(val_x, dtype=np.float32)), one_hot(val_y, c)
    if model is None:
        torch.manual_seed(seed)
        model = make_model(X.shape[1])
    opt = make_optimizer(model.parameters(), lr)
    rng = np.random.default_rng(seed)
    order = order or (lambda epoch, n: rng.permutation(n))
    steps = X.shape[0] // batch
    if steps == 0:
        raise ValueError(f"{X.shape[0]} training rows < batch {batch}")
    run = ModalityRun(best_epoch=0, best_val_sup=math.inf)
    val_labelled = VY.sum(1) > 0
    for epoch in range(1, epochs + 1):
        perm = torch.from_numpy(np.asarray(order(epoch, X.shape[0]), dtype=np.int64))
        total = 0.0
        for j in range(steps):
            idx = perm[j * batch : (j + 1) * batch]
            xb, yb = X[idx], Y[idx]
            h, x_hat = model(xb)
            loss, _, _ = loss_fn(x_hat, xb, h, P, yb, lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach().item()
        run.train_loss.append(total / steps)
        with torch.no_grad():
            h = model.encode(VX)
            sup = torch.linalg.vector_norm(h.double() @ P.double() - VY.double(), dim=1)[val_labelled]
            v = float(sup.mean()) if sup.numel() else math.nan
        run.val_sup.append(v)
        if not sup.numel() or v < run.best_val_sup:  # no labelled validation rows: keep the last
            run.best_val_sup, run.best_epoch = v, epoch
            run.encoder = copy.deepcopy(model.encoder_state())
    model.load_state_dict(run.encoder, strict=False)
    return model, run


@torch.no_grad()
def encode(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return model.encode(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).double().numpy()


def average_precisions(q: np.ndarray, g: np.ndarray, ql: np.ndarray, gl: np.ndarray) -> np.ndarray:
    """AP@all of every query (float64): rank the gallery by descending cosine similarity, ties by
    ascending gallery index; AP = (1/r) sum_j rel_j * prec@j, r = relevant items retrieved (all
    of them at k = all), 0 for a query with none. Labels: [n] class ids or [n, c] multi-hot."""
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
    sim = qn @ gn.T
    ranks = np.argsort(-sim, axis=1, kind="stable")
    if ql.ndim == 1:
        rel = (gl[ranks] == ql[:, None]) & (ql[:, None] >= 0)
    else:
        rel = (ql.astype(np.float64) @ gl.T.astype(np.float64) > 0)
        rel = np.take_along_axis(rel, ranks, axis=1)
    rel = rel.astype(np.float64)
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, rel.shape[1] + 1)
    r = rel.sum(axis=1)
    return np.where(r > 0, (prec * rel).sum(axis=1) / np.maximum(r, 1), 0.0)


def map_table(codes: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """mAP@all of every ordered pair (q != g) and their average."""
    m = len(codes)
    table = np.full((m, m), np.nan)
    for a in range(m):
        for b in range(m):
            if a != b:
                table[a, b] = average_precisions(codes[a], codes[b], np.asarray(labels[a]), np.asarray(labels[b])).mean()
    return table, float(np.nanmean(table))


def run_reference(modalities: Sequence[dict], num_classes: int, seed: int, epochs: int, batch: int = BATCH) -> dict:
    """Train every modality one after another (serial) and evaluate on the test splits.

    modalities: dicts with numpy arrays train_x, train_y, val_x, val_y, test_x, test_y.
    Returns {"map_all", "table", "best_epochs", "val_sup", "train_loss"}.
    """
    P = make_P(CODE_DIM, num_classes, seed)
    codes, labels, runs = [], [], []
    for i, m in enumerate(modalities):
        lr = LRS[min(i, len(LRS) - 1)]
        model, run = train_modality(m["train_x"], m["train_y"], m["val_x"], m["val_y"], P, lr,
                                    seed * 1000 + i, epochs, batch)
        codes.append(encode(model, m["test_x"]))
        labels.append(m["test_y"])
        runs.append(run)
    table, avg = map_table(codes, labels)
    return {
        "map_all": avg,
        "table": table.tolist(),
        "best_epochs": [r.best_epoch for r in runs],
        "val_sup": [r.val_sup for r in runs],
        "train_loss": [r.train_loss for r in runs],
    }
