"""Distillation divergences between a student's and a teacher's next-token distributions.

Each takes logits [N, V] for N positions and returns the divergence per position [N] (float32), so the
caller chooses which positions count and how to sum them. The teacher's logits are detached: gradients reach
only the student. A softmax temperature T > 1 softens both distributions (Hinton et al.); the caller
multiplies by T^2 to keep the gradient scale independent of T.

- forward KL  KL(p_T || p_S): mass-covering, the classic knowledge-distillation loss;
- reverse KL  KL(p_S || p_T): mode-seeking (MiniLLM), the student may ignore teacher modes it cannot fit;
- generalized JSD with beta (GKD, Agarwal et al. 2024):
  beta KL(p_T || m) + (1 - beta) KL(p_S || m) with m = beta p_T + (1 - beta) p_S; beta = 0.5 is the symmetric
  Jensen-Shannon divergence; scaled by 1/beta it tends to forward KL as beta -> 0, and by 1/(1 - beta) to
  reverse KL as beta -> 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fleetlm.errors import ConfigError

DIVERGENCES = ("kl", "rkl", "gkd")


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    if temperature <= 0:
        raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} differ in shape")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return log_s, log_t


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (0 * log 0 taken as 0, as kl_div does)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_t, log_s)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_s, log_t)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"gkd beta must lie strictly between 0 and 1 (kl, rkl are the ends), got {beta}")
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    # log m in log space: no exp/log round trip that would lose the tails
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def divergence(method: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
               temperature: float = 1.0) -> torch.Tensor:
    """The per-position divergence: "kl" (forward), "rkl" (reverse) or "gkd" (generalized JSD, beta)."""
    if method == "kl":
        return forward_kl(student_logits, teacher_logits, temperature)
    if method == "rkl":
        return reverse_kl(student_logits, teacher_logits, temperature)
    if method == "gkd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature)
    raise ConfigError(f"unknown divergence {method!r}: choose one of {', '.join(DIVERGENCES)}")
