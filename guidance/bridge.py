"""The one place where torch meets JAX: dlpack, zero-copy when both live on the same device.

Observables are pure JAX functions of coordinates; predictors are torch modules.  Guidance needs the value of an
observable's log-likelihood and its gradient with respect to torch coordinates.  ``torch_to_jax`` and
``jax_to_torch`` hand buffers across without copying (the DLPack protocol); ``value_and_grad`` evaluates a JAX
function on a torch tensor and returns torch tensors that *are* the JAX result buffers; ``JaxFunction`` makes the
same computation an autograd node so that gradients can continue back through a torch network.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import torch


def _jax_platforms() -> set[str]:
    return {d.platform for d in jax.devices()}


def torch_to_jax(t: torch.Tensor) -> jax.Array:
    """A JAX view of a torch tensor (detached).  Zero-copy on the same device; a CUDA tensor goes through host memory
    only when JAX has no GPU backend.  A float64 tensor becomes a float32 copy unless JAX's x64 mode is on."""
    t = t.detach()
    if t.device.type == "cuda" and "gpu" not in _jax_platforms() and "cuda" not in _jax_platforms():
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return jax.dlpack.from_dlpack(t)


def jax_to_torch(a: jax.Array, device: torch.device | None = None) -> torch.Tensor:
    """A torch view of a JAX array (zero-copy).  The tensor must be treated as read-only: JAX buffers are immutable."""
    t = torch.from_dlpack(a)
    if device is not None and t.device != torch.device(device):
        t = t.to(device)
    return t


def value_and_grad(fn: Callable[..., jax.Array], *, jit: bool = True) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Wrap ``fn(x, *args) -> values`` (JAX; ``values`` any shape, typically one log-likelihood per particle [P]) as a
    torch-callable returning ``(values, d sum(values) / dx)``.  If ``fn`` returns ``(values, aux)``, the call returns
    ``(values, grad, aux)`` with the pytree ``aux`` converted to torch as well.

    Entries of ``values`` that depend on disjoint slices of ``x`` (independent particles) get their own gradients in
    one reverse pass, because the gradient of the sum is the stack of the per-particle gradients.  The returned torch
    tensors share memory with the JAX results (no copy on CPU, or on the GPU when JAX has one).
    """

    def total(x, *args):
        out = fn(x, *args)
        values, aux = out if isinstance(out, tuple) else (out, None)
        return jnp.sum(values), (values, aux)

    vg = jax.value_and_grad(total, has_aux=True)
    if jit:
        vg = jax.jit(vg)

    def call(x: torch.Tensor, *args):
        jargs = [torch_to_jax(a) if isinstance(a, torch.Tensor) else a for a in args]
        (_, (values, aux)), grad = vg(torch_to_jax(x), *jargs)
        values, grad = jax_to_torch(values, x.device), jax_to_torch(grad, x.device)
        if aux is None:
            return values, grad
        return values, grad, jax.tree_util.tree_map(lambda a: jax_to_torch(a, x.device), aux)

    call.jax_value_and_grad = vg  # exposed for tests and benchmarks
    return call


class JaxFunction:
    """A JAX function of coordinates as a differentiable torch function: ``JaxFunction(fn)(x) -> values`` with
    ``values.backward()`` reaching ``x`` (and anything upstream of it, e.g. a denoising network).

    ``fn(x, *args)`` must give values whose leading dimensions match ``x``'s (one value per particle) or a scalar.
    """

    def __init__(self, fn: Callable[..., jax.Array], *, jit: bool = True):
        self._vg = value_and_grad(fn, jit=jit)

    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        return _BridgeApply.apply(x, self._vg, len(args), *args)


class _BridgeApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, vg, n_args, *args):
        values, grad = vg(x, *args)[:2]
        ctx.save_for_backward(grad)
        ctx.n_args = n_args
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        (grad,) = ctx.saved_tensors
        scale = grad_values.reshape(grad_values.shape + (1,) * (grad.dim() - grad_values.dim()))
        return (grad * scale.to(grad.dtype), None, None) + (None,) * ctx.n_args
