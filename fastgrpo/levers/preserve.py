"""Updates that leave chosen prompts' conditioning in place (`train.preserve_prompts=safe`).

The cross-attention's text projections (attn2.to_k, attn2.to_v) map each text-encoder state h (D,) to a key W_k h and
a value W_v h. An update dW changes them by dW h. Let U (D, k) span the directions that hold `energy` of the preserved
prompts' states (their top-k right singular vectors; the empty prompt is always included: classifier-free guidance
conditions on it). Every optimiser step is then corrected to dW (I - U U^T), so for a preserved state h the keys and
values move by dW (h - U U^T h): only through the part of h outside the subspace (1 - energy of it, summed over the
preserved prompts). Prompts whose states reach outside the subspace (an unsafe word the safe prompts never use) can
still move. The correction is applied to the step the optimiser took (whatever AdamW's per-element scaling and weight
decay made of the gradient), so the guarantee does not depend on the optimiser.

With `directions` N > 0 (`train.update_directions`) the step is instead projected onto R (D, N), the top N directions
of the unsafe prompts' states after U is removed from them: dW R R^T. In the spot world one such direction holds 65%
of that residual and is shared by held-out and out-of-domain spot words, so the update acts on the spot word's
contribution and leaves the rest of an unsafe prompt's conditioning (its colour and shape) where it was.
"""

from __future__ import annotations

import torch

from fastgrpo.errors import ConfigError

PROTECTED = ("attn2.to_k.weight", "attn2.to_v.weight")


def state_basis(states: torch.Tensor, energy: float) -> torch.Tensor:
    """(D, k) orthonormal directions holding `energy` of the rows of states (N, D)."""
    _, singular, right = torch.linalg.svd(states.double(), full_matrices=False)
    cumulative = (singular ** 2).cumsum(0) / (singular ** 2).sum()
    k = int((cumulative < energy).sum()) + 1
    return right[:k].T.contiguous()


class PreservedSubspace:
    """Projects every update of the UNet's trainable text projections off a (D, k) basis."""

    def __init__(self, unet: torch.nn.Module, basis: torch.Tensor, allowed: torch.Tensor | None = None):
        """basis (D, k): directions no update may touch; allowed (D, N), orthogonal to basis: with it, updates are
        limited to its span."""
        trainable = {name: p for name, p in unet.named_parameters() if p.requires_grad}
        others = [name for name in trainable if not name.endswith(PROTECTED)]
        if others:
            raise ConfigError(f"train.preserve_prompts: {others[0]} trains too, and it would move the preserved "
                              "prompts; limit train.trainable_modules to attn2.to_k and attn2.to_v")
        self.parameters = list(trainable.values())
        if not self.parameters or any(p.shape[1] != basis.shape[0] for p in self.parameters):
            raise ConfigError("train.preserve_prompts: no trainable text projection takes the text encoder's states")
        device = self.parameters[0].device
        if allowed is None:
            self.complement = torch.eye(basis.shape[0], dtype=torch.float64, device=device) \
                - basis.to(device) @ basis.to(device).T  # (D, D)
        else:
            self.complement = allowed.to(device) @ allowed.to(device).T  # (D, D)
        self._before: list[torch.Tensor] = []

    def before_step(self) -> None:
        self._before = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def after_step(self) -> None:
        for parameter, before in zip(self.parameters, self._before):
            delta = (parameter - before).double() @ self.complement        # (out, D)
            parameter.copy_((before.double() + delta).to(parameter.dtype))
        self._before = []


def residual_directions(states: torch.Tensor, basis: torch.Tensor, count: int) -> torch.Tensor:
    """(D, count): the top directions of states (N, D) once the span of basis (D, k) is removed from them."""
    residual = states.double() - states.double() @ basis @ basis.T
    _, _, right = torch.linalg.svd(residual, full_matrices=False)
    return right[:count].T.contiguous()


def preserved_subspace(unet, models, prompts: list[str], energy: float, *, unsafe_prompts: list[str] = (),
                       directions: int = 0) -> PreservedSubspace:
    """The projection for `prompts` (plus the empty prompt) under the models' text encoder; with directions > 0,
    limited to the top directions of `unsafe_prompts` outside it."""
    from fastgrpo.models import encode_prompts

    states = torch.cat([encode_prompts(models, prompts), encode_prompts(models, [""])])  # (P + 1, L, D)
    basis = state_basis(states.reshape(-1, states.shape[-1]), energy)
    allowed = None
    if directions > 0:
        unsafe = encode_prompts(models, list(unsafe_prompts))
        allowed = residual_directions(unsafe.reshape(-1, unsafe.shape[-1]), basis, directions)
    return PreservedSubspace(unet, basis, allowed)
