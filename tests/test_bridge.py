"""The torch <-> JAX bridge: zero-copy buffers, exact values and gradients, and autograd through JAX functions.

The test function is a smooth per-particle "energy" of coordinates x [P, N, 3] (A) that couples every pair of atoms
of a particle and no atoms of different particles:

    f_p(x) = sum_{i<j} 1 / (1 + |x_pi - x_pj|^2)  +  sum_{i,k} sin(x_pik)

written three times: in JAX (the function under test), in torch (autograd reference) and in numpy float64 (values and
central differences).
"""

from __future__ import annotations

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from guidance import bridge
from guidance.bridge import JaxFunction, jax_to_torch, torch_to_jax, value_and_grad

P, N = 4, 5


def energy_jax(x):
    d2 = jnp.sum(jnp.square(x[..., :, None, :] - x[..., None, :, :]), axis=-1)  # [P, N, N]
    iu = jnp.triu_indices(x.shape[-2], k=1)
    pair = jnp.sum(1.0 / (1.0 + d2[..., iu[0], iu[1]]), axis=-1)
    return pair + jnp.sum(jnp.sin(x), axis=(-2, -1))


def energy_torch(x):
    d2 = ((x[..., :, None, :] - x[..., None, :, :]) ** 2).sum(-1)
    iu = torch.triu_indices(x.shape[-2], x.shape[-2], offset=1)
    pair = (1.0 / (1.0 + d2[..., iu[0], iu[1]])).sum(-1)
    return pair + torch.sin(x).sum((-2, -1))


def energy_numpy(x):
    d2 = ((x[..., :, None, :] - x[..., None, :, :]) ** 2).sum(-1)
    iu = np.triu_indices(x.shape[-2], k=1)
    pair = (1.0 / (1.0 + d2[..., iu[0], iu[1]])).sum(-1)
    return pair + np.sin(x).sum((-2, -1))


@pytest.fixture
def x64():
    """Run JAX in double precision for this test only (comparisons against float64 finite differences)."""
    with jax.experimental.enable_x64():
        yield


def coords(dtype=torch.float32, seed=0) -> torch.Tensor:
    return (1.5 * torch.randn(P, N, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


# ------------------------------------------------------------------------------------------------ zero copy


def test_torch_to_jax_and_back_share_one_buffer():
    """A torch tensor handed to JAX and back is the same memory in both directions (no copy on CPU)."""
    t = coords()
    a = torch_to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    back = jax_to_torch(a)
    assert back.data_ptr() == t.data_ptr()
    assert torch.equal(back, t)


def test_gradient_storage_is_the_jax_result_buffer(monkeypatch):
    """The gradient and values returned to torch by value_and_grad are views of the JAX result buffers: the pointer of
    every torch tensor handed back equals the unsafe_buffer_pointer of the JAX array it came from."""
    handed_over = []  # (jax buffer pointer, torch tensor) for every conversion made inside the call
    original = bridge.jax_to_torch

    def spy(a, device=None):
        t = original(a, device)
        handed_over.append((a.unsafe_buffer_pointer(), t))
        return t

    monkeypatch.setattr(bridge, "jax_to_torch", spy)
    vg = value_and_grad(energy_jax)
    x = coords()
    values, grad = vg(x)
    pointers = {t.data_ptr(): ptr for ptr, t in handed_over}
    assert grad.data_ptr() in pointers and pointers[grad.data_ptr()] == grad.data_ptr()
    assert values.data_ptr() in pointers and pointers[values.data_ptr()] == values.data_ptr()

    # the same through the exposed JAX function: its gradient buffer becomes the torch tensor's storage
    (_, (jvalues, _)), jgrad = vg.jax_value_and_grad(torch_to_jax(x))
    assert original(jgrad).data_ptr() == jgrad.unsafe_buffer_pointer()
    assert original(jvalues).data_ptr() == jvalues.unsafe_buffer_pointer()


# ------------------------------------------------------------------------------------------------ values and gradients


def test_values_and_gradients_match_float64_finite_differences(x64):
    """In float64, per-particle values equal the numpy formula and the gradient equals central differences.

    Central differences with h = 1e-5 have truncation error ~h^2 |f'''| ~ 1e-10 and round-off ~eps |f| / h ~ 1e-10
    (|f| ~ 10), so 1e-7 absolute is a safe bound that any real error (a missing term, a wrong sign) exceeds by far.
    """
    x = coords(torch.float64)
    values, grad = value_and_grad(energy_jax)(x)
    assert values.dtype == torch.float64 and grad.shape == x.shape
    xn = x.numpy().copy()
    np.testing.assert_allclose(values.numpy(), energy_numpy(xn), rtol=0, atol=1e-12)

    h = 1e-5
    fd = np.zeros_like(xn)
    for idx in np.ndindex(*xn.shape):
        plus, minus = xn.copy(), xn.copy()
        plus[idx] += h
        minus[idx] -= h
        fd[idx] = (energy_numpy(plus).sum() - energy_numpy(minus).sum()) / (2 * h)
    np.testing.assert_allclose(grad.numpy(), fd, rtol=0, atol=1e-7)


def test_float32_values_and_gradients_agree_with_float64():
    """The default float32 path agrees with the exact (float64 torch autograd) values and gradients.

    Each value sums 10 pair terms and 15 sines of size <= 1, so float32 round-off (eps = 1.2e-7) stays below
    ~25 * eps * 1 ~ 3e-6; 2e-5 absolute leaves a margin of about 6x and is still far below any real error."""
    x32 = coords(torch.float32)
    values, grad = value_and_grad(energy_jax)(x32)
    assert values.dtype == torch.float32 and grad.dtype == torch.float32
    x64_ = x32.double().requires_grad_(True)
    ref = energy_torch(x64_)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64_)
    np.testing.assert_allclose(values.double().numpy(), ref.detach().numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad.numpy(), rtol=0, atol=2e-5)


def test_each_particle_gets_its_own_gradient(x64):
    """One reverse pass over P particles gives each particle the gradient of its own value: equal to evaluating the
    particle alone, and unchanged when another particle moves."""
    vg = value_and_grad(energy_jax)
    x = coords(torch.float64)
    values, grad = vg(x)
    for p in range(P):
        v_alone, g_alone = vg(x[p : p + 1].clone())
        np.testing.assert_allclose(v_alone.numpy(), values[p : p + 1].numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(g_alone.numpy(), grad[p : p + 1].numpy(), rtol=0, atol=1e-12)

    moved = x.clone()
    moved[1:] += 3.0  # move every particle except the first
    values_m, grad_m = vg(moved)
    np.testing.assert_allclose(values_m[0].numpy(), values[0].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad_m[0].numpy(), grad[0].numpy(), rtol=0, atol=1e-12)
    assert not np.allclose(grad_m[1:].numpy(), grad[1:].numpy())


# ------------------------------------------------------------------------------------------------ autograd


def test_gradients_flow_through_an_upstream_torch_op(x64):
    """JaxFunction is an autograd node: the gradient of a weighted sum of per-particle values with respect to the
    parameters of a torch op upstream of the coordinates equals pure-torch autograd of the same composition."""
    gen = torch.Generator().manual_seed(1)
    base = coords(torch.float64, seed=2)
    w0 = torch.eye(3, dtype=torch.float64) + 0.2 * torch.randn(3, 3, generator=gen, dtype=torch.float64)
    b0 = torch.randn(3, generator=gen, dtype=torch.float64)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)  # a different d loss / d value per particle

    def network(w, b):  # a small torch "denoiser": linear map and a tanh
        return torch.tanh(base @ w + b) * 2.0

    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    values = JaxFunction(energy_jax)(network(w, b))
    (values * upstream).sum().backward()

    w_ref, b_ref = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    values_ref = energy_torch(network(w_ref, b_ref))
    (values_ref * upstream).sum().backward()

    np.testing.assert_allclose(values.detach().numpy(), values_ref.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), w_ref.grad.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(b.grad.numpy(), b_ref.grad.numpy(), rtol=0, atol=1e-10)


def test_scalar_valued_jax_function_backpropagates(x64):
    """A scalar JAX function (one value for the whole batch) also backpropagates: d(c * f)/dx = c * grad f."""
    x = coords(torch.float64).requires_grad_(True)
    total = JaxFunction(lambda c: jnp.sum(energy_jax(c)))(x)
    assert total.shape == ()
    (2.5 * total).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (2.5 * energy_torch(x_ref).sum()).backward()
    np.testing.assert_allclose(x.grad.numpy(), x_ref.grad.numpy(), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------ aux outputs


def test_aux_outputs_come_back_as_torch_and_do_not_enter_the_gradient(x64):
    """fn returning (values, aux) gives (values, grad, aux): aux is a pytree of torch tensors with the right numbers,
    and the gradient is that of the values alone."""

    def with_aux(x):
        centroid = jnp.mean(x, axis=-2)  # [P, 3]
        rg = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(x - centroid[..., None, :]), -1), -1))  # [P]
        return energy_jax(x), {"centroid": centroid, "rg": rg}

    x = coords(torch.float64)
    out = value_and_grad(with_aux)(x)
    assert len(out) == 3
    values, grad, aux = out
    assert set(aux) == {"centroid", "rg"}
    assert all(isinstance(v, torch.Tensor) for v in aux.values())
    np.testing.assert_allclose(aux["centroid"].numpy(), x.mean(1).numpy(), rtol=0, atol=1e-12)
    rg = ((x - x.mean(1, keepdim=True)) ** 2).sum(-1).mean(-1).sqrt()
    np.testing.assert_allclose(aux["rg"].numpy(), rg.numpy(), rtol=0, atol=1e-12)

    values_plain, grad_plain = value_and_grad(energy_jax)(x)
    np.testing.assert_allclose(values.numpy(), values_plain.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), grad_plain.numpy(), rtol=0, atol=1e-12)
