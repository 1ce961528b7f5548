"""The padded-sequence case shared by the engines' training-pass tests (issue 14): a token model
with an embedding (padding_idx 0) and Linear layers over the sequence, ragged sequences padded with
token 0 / label -100, a token-level cross-entropy normalized by the micro-batch's non-padding count,
and the exact per-sample loop over a global batch (docs/moments.md, "Definition"). Only torch here,
so that every worker and test can import it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PadNet(nn.Module):
    """Embedding (padding_idx 0) -> Linear over the sequence -> tanh -> LayerNorm -> Linear to
    per-token logits."""

    def __init__(self, vocab: int = 11, dim: int = 6, hid: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.lin = nn.Linear(dim, hid)
        self.norm = nn.LayerNorm(hid)
        self.head = nn.Linear(hid, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.lin(self.emb(idx)))))


#: PadNet's adapted (measured) weights
ADAPTED = ("emb.weight", "lin.weight", "head.weight")


def padded_batch(g: torch.Generator, n: int, t_len: int = 6, vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """n ragged sequences (lengths 1..t_len), padded with token 0 / label -100."""
    x = torch.randint(1, vocab, (n, t_len), generator=g)
    lengths = torch.randint(1, t_len + 1, (n,), generator=g)
    pad = torch.arange(t_len) >= lengths[:, None]
    labels = torch.randint(1, vocab, (n, t_len), generator=g).masked_fill(pad, -100)
    return x.masked_fill(pad, 0), labels


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (0 at padding) and their sum over the micro-batch's non-padding
    labels divided by their count."""
    tokens = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                             reduction="none").view(labels.shape)
    return tokens, tokens.sum() / (labels != -100).sum()


def exact_padded(model: nn.Module, batches, per_sequence_mean: bool = False):
    """The exact per-sample loop over a global batch: ``batches`` lists every micro-batch (x, y) of
    every process; each is backpropagated as ``L_kj = sum_t l_t / T_kj`` (T_kj: its non-padding
    labels) and the engine averages the gradients over the K A equal micro-batches. Sequence i's part,
    scaled to the batch mean, is ``f_i = b sum_{t in i} l_{i,t} / T_kj`` (b sequences per micro-batch);
    the N parts average to the gradient used. Autograd on one sequence at a time (in the model's dtype), sums in float64.
    ``per_sequence_mean``: the wrong unit ``f_i = mean_{t in i} l_{i,t}`` (for can-fail checks).
    Returns ``({name: S_k}, {name: ||G_k||^2}, {name: G})``."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    n_total = sum(len(x) for x, _ in batches)
    sq = {n: 0.0 for n in names}
    grad = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for x, y in batches:
        b, tokens = len(x), int((y != -100).sum())
        for i in range(b):
            count = b * int((y[i] != -100).sum()) if per_sequence_mean else tokens
            f_i = b * F.cross_entropy(model(x[i:i + 1])[0], y[i], ignore_index=-100, reduction="sum") / count
            gs = torch.autograd.grad(f_i, params, allow_unused=True)
            for n, p, g in zip(names, params, gs):
                g = torch.zeros_like(p) if g is None else g.double()
                grad[n] += g / n_total
                sq[n] += float(g.square().sum())
    s = {n: sq[n] / n_total for n in names}
    g_sq = {n: float(grad[n].square().sum()) for n in names}
    return s, g_sq, grad
