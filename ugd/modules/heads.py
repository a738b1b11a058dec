"""The multi-task heads of docs/spec.md section 5, on top of the backbone's last hidden state F (size H).

    F_t      = FC_t([V_Q; V_D])        2H -> H, with a non-linearity (a purely linear FC_t followed by
                                        the linear classifier would make the two-tower logits a sum of a
                                        query term and a document term: no interaction)
    Logits_t = FC(F_t), Logits_s = FC(V_s)   one shared classifier H -> C
    F^_t     = FC_t^kl(F_t), F^_s = FC_s^kl(V_s)   H -> K (kl_dim)
"""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {"gelu": nn.GELU, "tanh": nn.Tanh, "relu": nn.ReLU}


class UGDHeads(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, kl_dim: int, *, two_tower: bool, single_tower: bool,
                 activation: str = "gelu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"head_activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.classifier = nn.Linear(hidden_size, num_labels)
        self.fc_t = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), _ACTIVATIONS[activation]()) \
            if two_tower else None
        # The embedding-KL projections exist only where both towers do (the distillation of UGD-TTM).
        both = two_tower and single_tower
        self.fc_t_kl = nn.Linear(hidden_size, kl_dim) if both else None
        self.fc_s_kl = nn.Linear(hidden_size, kl_dim) if both else None

    def two_tower_features(self, v_q: torch.Tensor, v_d: torch.Tensor) -> torch.Tensor:
        """F_t [N, H] from V_Q and V_D [N, H]."""
        self._fc_t_linear()  # raises without a two-tower head
        return self.fc_t(torch.cat([v_q, v_d], dim=-1))

    # Two-tower scoring of many pairs that share queries or documents (ranking against stored document
    # vectors): FC_t's first layer splits as W [V_Q; V_D] + b = (W_q V_Q + b) + W_d V_D, so each side is
    # projected once (an H x H product per text) and a pair costs an addition, the activation and FC.

    def query_part(self, v_q: torch.Tensor) -> torch.Tensor:
        """W_q V_Q + b [N, H] from V_Q [N, H]."""
        lin = self._fc_t_linear()
        h = v_q.shape[-1]
        return torch.nn.functional.linear(v_q, lin.weight[:, :h], lin.bias)

    def document_part(self, v_d: torch.Tensor) -> torch.Tensor:
        """W_d V_D [M, H] from V_D [M, H]."""
        lin = self._fc_t_linear()
        return torch.nn.functional.linear(v_d, lin.weight[:, v_d.shape[-1]:])

    def two_tower_logits_from_parts(self, query_part: torch.Tensor, document_part: torch.Tensor) -> torch.Tensor:
        """Logits_t [..., C] from broadcastable ``query_part`` and ``document_part`` [..., H]."""
        return self.classifier(self.fc_t[1](query_part + document_part))

    def _fc_t_linear(self) -> nn.Linear:
        if self.fc_t is None:
            raise RuntimeError("this model has no two-tower head (its paradigm is single-tower)")
        return self.fc_t[0]
