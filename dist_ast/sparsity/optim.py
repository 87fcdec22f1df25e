"""SGD that moves only the active sub-net's weights (DESIGN §1.3).

Each parameter may come with a boolean update mask (the active sub-net's weight mask,
or the active row of a switchable BatchNorm). Outside it nothing changes: not the
weight, not its momentum, no weight decay. The authors' released code shares plain SGD
momentum and weight decay, which drifts the inactive weights; we do not, unless
``optim.inactive_weights=moving``, where the sparse weights get no update mask
(:meth:`dist_ast.sparsity.model.SubnetModel.update_masks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


@torch.no_grad()
def masked_sgd_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    update_mask: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
) -> torch.Tensor | None:
    """One SGD step on ``param`` in place, only where ``update_mask`` is True.

    Returns the (new) momentum buffer, or None when momentum is 0.
    """
    # d = g + wd·p; buf' = μ·buf + d; p -= lr·buf' (nesterov: lr·(d + μ·buf')), each only
    # where the mask is set. `d` is the step's one temporary: every later result is
    # written into it or into the buffer in place (the ResNet-50 step spends ~0.05 s in
    # this function on CPU; each extra temporary or pass over 25M weights costs ~10 ms).
    if weight_decay and grad.dtype == param.dtype:
        d = torch.add(grad, param, alpha=weight_decay)
    else:
        d = grad.to(param.dtype, copy=True)
        if weight_decay:
            d.add_(param, alpha=weight_decay)
    if momentum:
        if momentum_buffer is None:
            momentum_buffer = torch.zeros_like(param)
        if nesterov:
            new_buf = torch.add(d, momentum_buffer, alpha=momentum)
            _masked_copy_(momentum_buffer, new_buf, update_mask)
            d.add_(momentum_buffer, alpha=momentum)
        else:
            d.add_(momentum_buffer, alpha=momentum)  # d is now buf'
            _masked_copy_(momentum_buffer, d, update_mask)
    if update_mask is not None:
        torch.where(update_mask, d, torch.zeros((), dtype=d.dtype, device=d.device), out=d)
    param.add_(d, alpha=-lr)
    return momentum_buffer


def _masked_copy_(dst: torch.Tensor, src: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is None:
        dst.copy_(src)
    else:
        torch.where(mask, src, dst, out=dst)


def _masked_copy_all_(
    dsts: list[torch.Tensor], srcs: list[torch.Tensor], masks: list[torch.Tensor | None]
) -> None:
    plain = [i for i, m in enumerate(masks) if m is None]
    if plain:
        torch._foreach_copy_([dsts[i] for i in plain], [srcs[i] for i in plain])
    for dst, src, m in zip(dsts, srcs, masks, strict=True):
        if m is not None:
            torch.where(m, src, dst, out=dst)


@torch.no_grad()
def masked_sgd_foreach_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    update_masks: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
) -> None:
    """:func:`masked_sgd_` on many parameters at once, bit for bit the same.

    The arithmetic runs as ``torch._foreach_*`` calls (a few fused kernels on a GPU
    instead of ~6 launches per parameter); only the masked momentum copy stays a
    per-parameter ``torch.where`` (there is no foreach ``where``). The update is
    zeroed outside the mask by a multiply (d·0 = ±0, and p − lr·(±0) = p), which is
    exact for the finite values an applied step has. ``momentum_buffers`` must exist
    (zeros for a first step) when ``momentum`` is set.
    """
    if not params:
        return
    if weight_decay and all(g.dtype == p.dtype for g, p in zip(grads, params, strict=True)):
        d = torch._foreach_add(grads, params, alpha=weight_decay)
    else:
        d = [g.to(p.dtype, copy=True) for g, p in zip(grads, params, strict=True)]
        if weight_decay:
            torch._foreach_add_(d, params, alpha=weight_decay)
    if momentum:
        assert momentum_buffers is not None
        if nesterov:
            new_bufs = torch._foreach_add(d, momentum_buffers, alpha=momentum)
            _masked_copy_all_(momentum_buffers, new_bufs, update_masks)
            torch._foreach_add_(d, momentum_buffers, alpha=momentum)
        else:
            torch._foreach_add_(d, momentum_buffers, alpha=momentum)  # d is now buf'
            _masked_copy_all_(momentum_buffers, d, update_masks)
    masked = [i for i, m in enumerate(update_masks) if m is not None]
    if masked:
        torch._foreach_mul_([d[i] for i in masked], [update_masks[i] for i in masked])
    torch._foreach_add_(params, d, alpha=-lr)


class MaskedSGD(torch.optim.Optimizer):
    """SGD with momentum/nesterov/weight decay, applied only inside per-parameter masks.

    ``step(update_masks)`` takes {parameter: bool mask broadcastable to it}; parameters
    missing from the mapping are updated everywhere (dense layers). Weight decay comes
    from each param group (0 for BatchNorm and biases).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if nesterov and momentum <= 0:
            raise ValueError("nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, update_masks: Mapping[torch.Tensor, torch.Tensor] | None = None, closure=None
    ) -> None:
        update_masks = update_masks or {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            bufs = None
            if group["momentum"]:
                bufs = []
                for p in params:  # dict look-ups only; the math below is foreach
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
            masked_sgd_foreach_(
                params,
                [p.grad for p in params],
                bufs,
                [update_masks.get(p) for p in params],
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
            )

    @torch.no_grad()
    def reset_state(self, param: torch.Tensor, where: torch.Tensor) -> None:
        """Zero the momentum of ``param`` at ``where`` (newly grown connections; the
        caller zeroes the weight, which subclasses holding a master copy also do)."""
        self.reset_momentum(param, where)

    @torch.no_grad()
    def reset_momentum(self, param: torch.Tensor, where: torch.Tensor) -> None:
        """Zero only the momentum of ``param`` at ``where`` (a regrown weight that keeps
        its value, ``ast.regrow_init=kept``)."""
        buf = self.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            buf.masked_fill_(where, 0.0)
