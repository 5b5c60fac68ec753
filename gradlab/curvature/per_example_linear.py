"""Per-example gradient moments of Linear layers without per-example gradients (the "ghost" trick).

For a Linear layer ``o = W a + b`` seen once per forward pass with a ``(B, in)`` input, example
``i``'s own gradients are the outer product ``dW_i = e_i a_i^T`` and ``db_i = e_i``, where
``e_i = B * dL/do_i`` is the output gradient of example ``i``'s own loss when the batch loss
``L`` is the mean of the examples' losses (Goodfellow 2015, "Efficient per-example gradient
computations"). So, with no ``(B, out, in)`` tensor ever formed:

* ``s_i = ||dW_i||^2 + ||db_i||^2 = ||e_i||^2 (||a_i||^2 + 1)``;
* the mean gradient ``dW = (1/B) sum_i e_i a_i^T = G^T A`` (``G = dL/do``, ``A`` the inputs),
  ``db = sum_i G_i``, and ``||g||^2 = ||dW||^2 + ||db||^2``;
* ``v_i = dW_i . dW + db_i . db = e_i^T dW a_i + e_i . db``.

These are the per-layer moments ``(s, v, ||g||^2)`` of :func:`gradlab.probes.gradstats.moments`
from one ordinary forward and backward pass (a backward to the layer outputs only), in float64.
A plain ``nn.Conv2d`` (no groups, zero padding) shares a weight across positions, so there the
per-example gradient ``dW_i = E_i U_i^T`` (``U_i`` the unfolded input patches, ``E_i`` the
example's output gradient at each position, as BackPACK's ``BatchGrad`` forms it) is formed from
the same captured input and output gradient -- small for the kernels of small CNNs, and the
trick is refused above ``2^24`` floats. :func:`hooked_pass` does the same pass and also returns
the loss and the gradients of chosen parameters, for callers that need both on one batch.
:func:`linear_moments` returns None where the trick does not apply -- a parameter outside an
``nn.Linear`` or plain ``nn.Conv2d``, a frozen parameter, a layer called more or less than once,
an input that is not ``(B, in)`` (``(B, C, H, W)`` for a conv) -- and the caller then uses
:func:`gradlab.curvature.per_example.per_example_grads`.
Like that primitive it assumes ``loss_fn`` is the mean of per-example losses and that the model
mixes no examples (BatchNorm in eval mode).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn


_MAX_CONV_GRADS = 1 << 24  # per-example conv gradients formed at once (float64 elements)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _linear_layers(model: nn.Module) -> Optional[dict]:
    """``{module name: layer}`` if every trainable parameter belongs to a Linear (or a plain
    Conv2d), else None."""
    layers = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if not own:
            continue
        if not name or not _supported(module) or not all(p.requires_grad for p in own):
            return None
        layers[name] = module
    return layers or None


def _linear(module, a, g, b):
    """The moments of one Linear layer from its float64 input ``a`` (B, in) and ``g = dL/do``,
    by :func:`_linear_gram` when that takes fewer multiplications (a batch small next to the
    layer: ``B (in + out) < 2 in out``), else through the mean gradient ``dW``."""
    if b * (a.shape[1] + g.shape[1]) < 2 * a.shape[1] * g.shape[1]:
        return _linear_gram(module, a, g, b)
    return _linear_direct(module, a, g, b)


def _linear_direct(module, a, g, b):
    """:func:`_linear` through the mean gradient ``dW = g^T a``: ``2 B in out`` multiplications."""
    e = g * b  # each example's own output gradient
    dw = g.T @ a  # the mean gradient of W: (out, in)
    e2 = (e * e).sum(1)
    a2 = (a * a).sum(1)
    v = ((e @ dw) * a).sum(1)
    g2 = float((dw * dw).sum())
    if module.bias is not None:
        db = g.sum(0)
        s = e2 * (a2 + 1.0)
        v = v + e @ db
        g2 += float(db.dot(db))
    else:
        s = e2 * a2
    return s, v, g2


def _linear_gram(module, a, g, b):
    """:func:`_linear` from the examples' Gram matrices ``GG = g g^T`` and ``AA = a a^T`` (plus 1
    with a bias: the input extended by a constant 1), never forming ``dW``: with
    ``K = GG * AA`` (elementwise), ``s_i = B^2 GG_ii AA_ii``, ``v_i = B sum_j K_ij`` and
    ``||g||^2 = ||g^T a||_F^2 = sum_ij K_ij`` -- ``B^2 (in + out)`` multiplications instead of
    ``2 B in out``."""
    aa = a @ a.T
    if module.bias is not None:
        aa = aa + 1.0
    gg = g @ g.T
    k = gg * aa
    return (b * b) * gg.diagonal() * aa.diagonal(), b * k.sum(1), float(k.sum())


def _conv2d(module, a, g, b):
    """The moments of one Conv2d from its input (B, C, H, W) and ``g = dL/do``: each example's
    weight gradient ``e_i U_i^T`` (``U_i`` its unfolded input patches, ``e_i`` its own output
    gradient over the output positions) is formed, (B, out, C*kh*kw) floats, in the layer's
    dtype (as vmap's per-example gradients are), and its moments in float64."""
    import torch.nn.functional as F

    cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    e = (g * b).reshape(b, g.shape[1], -1)  # (B, out, positions)
    parts = [torch.bmm(e, cols.transpose(1, 2)).reshape(b, -1)]
    if module.bias is not None:
        parts.append(e.sum(2))
    grads = torch.cat(parts, 1).to(torch.float64)
    mean = grads.mean(0)
    return (grads * grads).sum(1), grads @ mean, float(mean.dot(mean))


def hooked_pass(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, params=None):
    """One forward and backward pass on ``(x, y)`` that also yields every layer's per-example
    moments: ``(loss, grads, moments)`` -- the loss tensor (detached), the gradients of
    ``params`` (a list of tensors; None when ``params`` is None) and ``{layer: (s, v, ||g||^2)}``
    -- or None where the trick does not apply (module docstring). ``.grad`` is untouched."""
    layers = _linear_layers(model)
    if layers is None:
        return None
    seen: dict = {name: [] for name in layers}

    def keep(name):
        def hook(module, inputs, output):
            seen[name].append((inputs[0], output))
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    b = len(x)
    for name, v in seen.items():
        module = layers[name]
        want = 2 if isinstance(module, nn.Linear) else 4
        if len(v) != 1 or v[0][0].dim() != want or not v[0][1].requires_grad or len(v[0][0]) != b:
            return None
        if want == 4 and b * module.weight.numel() > _MAX_CONV_GRADS:
            return None
    names = list(layers)
    outputs = [seen[n][0][1] for n in names]
    params = None if params is None else list(params)
    loss = loss_fn(out, y)
    grads = torch.autograd.grad(loss, outputs + (params or []), allow_unused=True)
    result = {}
    for name, g_out, o in zip(names, grads, outputs):
        a = seen[name][0][0].detach()
        g = (torch.zeros_like(o) if g_out is None else g_out).detach()  # dL/do
        if isinstance(layers[name], nn.Linear):
            result[name] = _linear(layers[name], a.to(torch.float64), g.to(torch.float64), b)
        else:
            result[name] = _conv2d(layers[name], a, g, b)
    param_grads = None
    if params is not None:
        param_grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads[len(names):], params)]
    return loss.detach(), param_grads, result


def linear_moments(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> Optional[dict]:
    """``{layer: (s (B,), v (B,), ||g||^2)}`` of every Linear (and plain Conv2d) layer of
    ``model`` on ``(x, y)`` (layer: the module's name, as
    :func:`gradlab.probes.gradstats.layer_of` names it), or None where the trick does not apply
    (module docstring). Parameters' ``.grad`` are untouched."""
    done = hooked_pass(model, loss_fn, x, y)
    return None if done is None else done[2]


__all__ = ["hooked_pass", "linear_moments"]
