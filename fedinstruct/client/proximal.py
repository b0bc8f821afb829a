"""FedBiOT client proximal term: keeps local adapter updates near the round's starting point.

The client loss is ``CE + eps * proximal_term(model, snapshot_at_round_start)``. The term is
built from the live parameters, so it carries gradient back to them (pulling them towards the
reference), unlike an implementation that reads ``.data`` and only shifts the loss value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

NamedParams = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _named(params: NamedParams) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, torch.nn.Module):
        return list(params.named_parameters())
    if isinstance(params, Mapping):
        return list(params.items())
    return list(params)


def snapshot(params: NamedParams) -> dict[str, torch.Tensor]:
    """Detached clones of the given tensors (of a module: its trainable parameters)."""
    if isinstance(params, torch.nn.Module):
        pairs = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    else:
        pairs = _named(params)
    return {name: tensor.detach().clone() for name, tensor in pairs}


def proximal_term(model_or_named_params: NamedParams, reference: Mapping[str, torch.Tensor]):
    """Sum over trainable parameters present in ``reference`` of ||theta - theta_ref||^2.

    Differentiable w.r.t. theta. Raises when no trainable parameter matches a reference name,
    since a silent zero would disable the regularizer.
    """
    terms = []
    for name, param in _named(model_or_named_params):
        if not param.requires_grad or name not in reference:
            continue
        ref = reference[name]
        if ref.shape != param.shape:
            raise ValueError(
                f"reference[{name!r}] has shape {tuple(ref.shape)}, parameter has "
                f"{tuple(param.shape)}"
            )
        ref = ref.to(device=param.device, dtype=torch.float32)
        terms.append((param.float() - ref).pow(2).sum())
    if not terms:
        sample = sorted(reference)[:3]
        raise ValueError(
            f"no trainable parameter matches the reference names (e.g. {sample}); take the "
            "reference with snapshot() of the same model's named parameters"
        )
    return torch.stack(terms).sum()
