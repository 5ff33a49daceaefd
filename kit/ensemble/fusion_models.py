"""Small fusion models over the members' log-probabilities. torch only: the offline bundle embeds this file.

    model = build("gated", n_members=10, n_classes=396)
    logp = model(member_logp(z, beta), row_features(z), x=None)     # [n, C], rows normalised

Every model mixes the members' temperature-scaled probabilities with gates, then sharpens or softens
the mixture: p_c = softmax_c(beta_n * log sum_m g_nmc p_mc). The gates start equal and beta at 1, so an
untrained model is the equal-weight blend, and early stopping can only move away from it while that
helps on held-out rows.
- gated: a learned gate per member and class (G_mc), moved per row by a small net on the row features.
- transformer: members are tokens (their row features plus a member embedding; the fold-invariant
  features are one more token); self-attention across them gives each member's gate and beta.
- bilinear: low-rank bilinear pooling of two members' representations (tanh(U r_a) * tanh(V r_b))
  gives the gates and beta: what one member says matters depending on what the other says.
During fitting the models see the compressed view (`cols` are the class ids of its columns and `logw`
how many classes each column stands for); for predictions they see every class.
"""

from __future__ import annotations

import math

import torch
from torch import nn

N_ROW_FEATURES = 5
Z_FLOOR = -34.5  # log(1e-15): the metric treats smaller probabilities as 1e-15
MAX_LOG_BETA = 4.0


def member_logp(z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Members' log-probabilities [M, n, C] at inverse temperatures beta [M]."""
    return torch.log_softmax(beta[:, None, None] * z, dim=2)


def row_features(z: torch.Tensor) -> torch.Tensor:
    """Label-free summaries of each member's prediction on each row: [n, M, N_ROW_FEATURES].

    Top log-probability, margin to the runner-up, normalised entropy, agreement with the members'
    consensus class and the log-probability given to that class.
    """
    z = z.float()
    zc = z.clamp_min(Z_FLOOR)
    top2 = zc.topk(min(2, z.shape[2]), dim=2).values
    margin = top2[..., 0] - top2[..., -1]
    entropy = -(z.exp() * zc).sum(dim=2) / math.log(max(z.shape[2], 2))
    consensus = zc.mean(dim=0).argmax(dim=1)
    index = consensus[None, :, None].expand(z.shape[0], -1, 1)
    at_consensus = zc.gather(2, index)[..., 0]
    agree = (zc.argmax(dim=2) == consensus[None]).float()
    feats = torch.stack([top2[..., 0] / 10, margin / 10, entropy, agree, at_consensus / 10], dim=2)
    return feats.permute(1, 0, 2).contiguous()


def _zero_last(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Fusion(nn.Module):
    """Common output: gates [M, n, J or 1] and log beta [n] -> normalised log-probabilities [n, J]."""

    def __init__(self, n_members: int, n_classes: int, n_features: int, feature_dim: int, hidden: int):
        super().__init__()
        self.n_members, self.n_classes = n_members, n_classes
        self.n_features, self.feature_dim, self.hidden = n_features, feature_dim, hidden
        self.log_beta = nn.Parameter(torch.zeros(()))

    def gates(self, feats: torch.Tensor, x: torch.Tensor | None, cols: torch.Tensor | None):
        raise NotImplementedError

    def forward(self, logp, feats, x=None, cols=None, logw=None) -> torch.Tensor:
        gate, log_beta = self.gates(feats, x, cols)
        mix = torch.logsumexp(torch.log_softmax(gate, dim=0) + logp, dim=0)
        # beta within [e^-4, e^4]: a row the net extrapolates to a huge beta would give 0 * inf = NaN
        out = torch.exp(log_beta.clamp(-MAX_LOG_BETA, MAX_LOG_BETA))[:, None] * mix
        weight = 0.0 if logw is None else logw
        return out - torch.logsumexp(out + weight, dim=1, keepdim=True)

    def _inputs(self, feats: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        flat = feats.flatten(1)
        return flat if x is None else torch.cat([flat, x], dim=1)


class GatedFusion(Fusion):
    def __init__(self, n_members, n_classes, n_features=N_ROW_FEATURES, feature_dim=0, hidden=32):
        super().__init__(n_members, n_classes, n_features, feature_dim, hidden)
        self.class_gate = nn.Parameter(torch.zeros(n_members, n_classes))
        self.net = nn.Sequential(
            nn.Linear(n_members * n_features + feature_dim, hidden),
            nn.GELU(),
            _zero_last(nn.Linear(hidden, n_members + 1)),
        )

    def gates(self, feats, x, cols):
        h = self.net(self._inputs(feats, x))
        per_class = self.class_gate[:, None, :] if cols is None else self.class_gate[:, cols]
        return per_class + h[:, : self.n_members].T[:, :, None], self.log_beta + h[:, -1]


class TransformerFusion(Fusion):
    def __init__(self, n_members, n_classes, n_features=N_ROW_FEATURES, feature_dim=0, hidden=32, heads=4, layers=1):
        super().__init__(n_members, n_classes, n_features, feature_dim, hidden)
        self.heads, self.layers = heads, layers
        self.embed = nn.Linear(n_features, hidden)
        self.member = nn.Parameter(torch.randn(n_members, hidden) * 0.1)
        self.feature_token = nn.Linear(feature_dim, hidden) if feature_dim else None
        layer = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.gate_head = _zero_last(nn.Linear(hidden, 1))
        self.beta_head = _zero_last(nn.Linear(hidden, 1))

    def gates(self, feats, x, cols):
        tokens = self.embed(feats) + self.member
        if self.feature_token is not None:
            tokens = torch.cat([tokens, self.feature_token(x)[:, None]], dim=1)
        h = self.encoder(tokens)
        gate = self.gate_head(h[:, : self.n_members])[..., 0].T[:, :, None]
        return gate, self.log_beta + self.beta_head(h.mean(dim=1))[:, 0]


class BilinearFusion(Fusion):
    def __init__(self, n_members, n_classes, n_features=N_ROW_FEATURES, feature_dim=0, hidden=32, pair=(0, 1)):
        super().__init__(n_members, n_classes, n_features, feature_dim, hidden)
        self.pair = tuple(int(m) for m in pair)
        self.encode = nn.Sequential(nn.Linear(n_features + feature_dim, hidden), nn.Tanh())
        self.u = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.head = _zero_last(nn.Linear(hidden, n_members + 1))

    def gates(self, feats, x, cols):
        def represent(m: int) -> torch.Tensor:
            f = feats[:, m]
            return self.encode(f if x is None else torch.cat([f, x], dim=1))

        a, b = self.pair
        pooled = torch.tanh(self.u(represent(a))) * torch.tanh(self.v(represent(b)))
        h = self.head(pooled)
        return h[:, : self.n_members].T[:, :, None], self.log_beta + h[:, -1]


MODELS = {"gated": GatedFusion, "transformer": TransformerFusion, "bilinear": BilinearFusion}


def build(method: str, **args) -> Fusion:
    """The model of `method` from the arguments recorded in recipe.json["model"]."""
    return MODELS[method](**args)
