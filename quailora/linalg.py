"""Linear algebra shared by the initializers: truncated SVD, damping, balanced splits, objectives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from quailora.errors import QuailoraInputError

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch

SvdSolver = Literal["auto", "exact", "randomized"]
# Above this size a full SVD costs minutes on a CPU; randomized SVD with power iterations is used instead.
EXACT_SVD_MAX_DIM = 4096


def truncated_svd(
    x: torch.Tensor,
    rank: int,
    *,
    solver: SvdSolver = "auto",
    niter: int = 4,
    oversample: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r U (m x r), S (r), Vh (r x n) of x: exact, or randomized (Halko et al.) via torch.svd_lowrank."""
    if solver == "auto":
        solver = "exact" if min(x.shape) <= EXACT_SVD_MAX_DIM else "randomized"
    if solver == "exact":
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(rank + oversample, *x.shape)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(x, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


def damp(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """H + λ·mean(diag H)·I: keeps H well conditioned without changing its scale."""
    if damping <= 0:
        return gram
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return gram + damping * gram.diagonal().mean() * eye


def damped_cholesky(gram: torch.Tensor, damping: float, *, name: str, what: str = "Gram H") -> torch.Tensor:
    """Lower L with L Lᵀ = damp(H); a layer whose H is not positive definite gets an error naming it."""
    chol, info = torch.linalg.cholesky_ex(damp(gram, damping))
    if info:
        raise QuailoraInputError(
            f"layer {name}: {what} is not positive definite with damping={damping}; raise init.options.damping"
        )
    return chol


Factors = "tuple[torch.Tensor, torch.Tensor]"  # a string: nothing of torch is touched at import


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float) -> Factors:
    root = (s.clamp_min(0) / scaling).sqrt()
    return root[:, None] * vh, u * root


def _kaiming_a(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float) -> Factors:
    # Rows of norm 1/√3: what peft's Kaiming-uniform A (bound 1/√in) has in expectation, whatever the width.
    return vh / 3**0.5, u * (s.clamp_min(0) * 3**0.5 / scaling)


FactorSplit = Literal["balanced", "kaiming_a"]
# How U·S·Vh is shared between B and A. The product (the init's quality) is the same; fine-tuning is not:
# with "balanced" (QuAILoRA's even split) both factors are as small as the quantization error, so a step
# on B moves the product less than from QLoRA's init; "kaiming_a" gives A the magnitude QLoRA's A has.
SPLITS = {"balanced": _balanced, "kaiming_a": _kaiming_a}


def split_svd(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float, split: FactorSplit = "balanced"
) -> Factors:
    """peft's (lora_A, lora_B) with scaling·B·A = U diag(S) Vh, the factors shared as ``split`` says."""
    return SPLITS[split](u, s, vh, scaling)


def balanced_factors(
    m: torch.Tensor, a: torch.Tensor, scaling: float, split: FactorSplit = "balanced"
) -> Factors:
    """Re-split a rank-r product M·A (M: m x r, A: r x n) as ``split`` says, in O((m+n) r²) via two thin QRs."""
    qm, rm = torch.linalg.qr(m)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rm @ ra.T)
    return split_svd(qm @ u, s, vh @ qa.T, scaling, split)


def weight_error(error: torch.Tensor, product: torch.Tensor) -> float:
    """‖E − P‖²_F: the uncalibrated objective."""
    return float((error - product).square().sum())


def calibrated_error(error: torch.Tensor, product: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((E − P) H (E − P)ᵀ) = ‖X (E − P)ᵀ‖²_F / N: the output error on the calibration inputs."""
    d = error - product
    return float(((d @ gram) * d).sum())


def adapter_product(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * (lora_b @ lora_a)
