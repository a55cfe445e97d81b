"""The decoder's feed-forward blocks: the dense SwiGLU `MLP` and its sparse mixture, `SparseMoE`.

The dense MLP lives here rather than in `text.py` so that the experts can *be* MLPs without an import
cycle (`text.py` builds both and re-exports `MLP`). Experts are plain `nn.Linear` layers, so every
module swap that quantizes linears (`export/quantize.py:quantize_linears`) reaches them unchanged.

Routing follows Mixtral / MoE-LLaVA: a bias-free linear router (`gate`) scores the experts, softmax
(in fp32) turns the scores into probabilities, each token keeps its top `experts_per_token` experts,
and the kept probabilities are renormalised to sum to one. The block's output is the weighted sum of
the kept experts' outputs.

Export: the computation has static shapes and no data-dependent Python control flow. Every expert
runs on every token, and their outputs are combined with a dense [B, T, E] weight matrix that is zero
for the experts a token did not choose. An exported MoE layer therefore costs the FLOPs of all
`num_experts` experts; what a sparse kernel would execute per token, and what benchmarks report as
the model's size per token, is `active_parameters` (the chosen experts only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer / MoE-LLaVA load-balancing loss over N tokens routed to k experts each.

        loss = E * sum_e f_e * P_e
        f_e  = (number of (token, choice) pairs assigned to expert e) / (N * k)
        P_e  = (1 / N) * sum_tokens probs[token, e]

    `probs` [N, E] are the router's softmax probabilities (before top-k), `chosen` [N, k] the chosen
    expert indices. Perfect balance (f_e = P_e = 1 / E) gives exactly 1.0 for any E and k; putting
    everything on one expert with certainty gives E. Gradients flow through P_e only (the counts are
    not differentiable), which pushes probability away from over-used experts.

    Hugging Face's Mixtral divides the counts by N instead of N * k, i.e. its value is k times this
    one; dividing by N * k keeps the balanced value at 1.0 whatever `experts_per_token` is, so one
    `router_aux_loss_coef` means the same for every k.
    """
    n, k = chosen.shape
    counts = F.one_hot(chosen, num_experts).to(probs.dtype).sum(dim=(0, 1))  # [E]
    fraction = counts / (n * k)
    mean_prob = probs.mean(dim=0)
    return num_experts * (fraction * mean_prob).sum()


class SparseMoE(nn.Module):
    """`num_experts` SwiGLU experts behind a top-k router; x [B, T, D] -> [B, T, D].

    In training mode each call stores its load-balancing loss (a scalar tensor, see
    `load_balancing_loss`) in `aux_loss`, which `MobileVLM.forward` adds to the language-model loss
    weighted by `router_aux_loss_coef`; in eval mode `aux_loss` is None. Every token of the batch is
    counted, padding included (the block does not see an attention mask).
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        if config.num_experts < 1 or not 1 <= config.experts_per_token <= config.num_experts:
            raise ValueError(f"SparseMoE needs text.num_experts >= 1 and 1 <= text.experts_per_token <= num_experts, got {config.num_experts} / {config.experts_per_token}")
        self.num_experts = config.num_experts
        self.top_k = config.experts_per_token
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.num_experts))
        self.aux_loss: torch.Tensor | None = None

    def routing_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities [B, T, E] (fp32), chosen experts [B, T, k], and the dense combination
        weights [B, T, E] (fp32): the chosen experts' probabilities renormalised to sum to one, zero
        elsewhere."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        top_probs, chosen = torch.topk(probs, self.top_k, dim=-1)
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        # Scatter the k weights into E slots by comparison with arange (eq / mul / sum): ops every
        # backend lowers, where scatter and one_hot are not everywhere.
        slots = chosen.unsqueeze(-1) == torch.arange(self.num_experts, device=x.device)  # [B, T, k, E]
        dense = (top_probs.unsqueeze(-1) * slots.to(top_probs.dtype)).sum(dim=-2)
        return probs, chosen, dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, chosen, dense = self.routing_weights(x)
        if self.training:
            self.aux_loss = load_balancing_loss(probs.flatten(0, -2), chosen.flatten(0, -2), self.num_experts)
        else:
            self.aux_loss = None
        weights = dense.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # fixed E: unrolled at export, no data-dependent branch
            out = out + weights[..., e : e + 1] * expert(x)
        return out

    def __getstate__(self) -> dict:
        # The last call's loss belongs to that call's autograd graph; a non-leaf tensor cannot be
        # deep-copied, and the exporters deep-copy the model. Copies and pickles start without it.
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state


def active_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters used per token, all parameters) of `model` (a MobileVLM, a TextDecoder, ...).

    Every parameter counts as active except the experts a token does not use: per SparseMoE,
    `num_experts - experts_per_token` experts' worth. Shared (tied) tensors count once.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, SparseMoE):
            per_expert = sum(p.numel() for p in module.experts[0].parameters())
            inactive += (module.num_experts - module.top_k) * per_expert
    return total - inactive, total
