"""The batched client engine: the clients of one architecture group trained as one computation.

One-by-one, a round runs each sampled client's :func:`fedkd.train.train_local` in turn; a
32-sample step of a small CNN uses a fraction of what the hardware can do. Here the clients
that share an architecture and a local recipe are stacked (``torch.func.stack_module_state``)
and each local step is one ``vmap``-ed ``grad`` of a ``functional_call`` over all of their
batches. What each client computes is what :func:`~fedkd.train.train_local` computes for it:

* the same batches (each client's own index generator, seeded as one-by-one), padded to the
  step's largest batch; a mask keeps padding out of the loss and out of BatchNorm's statistics;
* the same loss: cross-entropy over the client's valid samples, FedGen's two terms on the same
  generator draws (:meth:`~fedkd.train.FedGenRegularizer.draw`, in the same RNG order),
  FedProx's proximal term against the client's own starting weights;
* the same optimizer: SGD with PyTorch's momentum and weight-decay rules, one momentum buffer
  per client; a client with fewer steps (``clients.local-epochs`` with unequal partitions) sits
  out the steps it does not have, and neither its weights nor its buffers move;
* BatchNorm in training mode with each client's own running statistics, updated as
  ``nn.BatchNorm`` does (biased variance to normalize, unbiased variance into
  ``running_var``, ``num_batches_tracked`` + 1 per step).

A group that cannot be batched (a layer with randomness such as dropout, buffers outside
BatchNorm, a cumulative-average BatchNorm, a regularizer other than FedGen's) is trained one
by one, and the log says so once per reason. ``tests/test_batched.py`` checks every client's
weights against the one-by-one ClientApp path for cnn, cnn-bn, lenet5, mlp and resnet8, with
FedProx and FedGen terms.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

from fedkd.train import FedGenRegularizer, LocalRule, LocalTrainConfig, batches, train_local

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("batched clients: %s; this group trains one by one", reason)


@dataclass
class Client:
    """One client's local update, as the ClientApp prepared it."""

    model: nn.Module  # loaded with the server's weights, on the device; trained in place
    x: Tensor
    y: Tensor
    cfg: LocalTrainConfig
    seed: int
    device: torch.device
    regularizer: FedGenRegularizer | None = None
    rule: LocalRule | None = None  # a strategy's client side (SCAFFOLD, FedDyn, MOON, FedNova)


def train_one(c: Client) -> float:
    """The one-by-one local update (:func:`~fedkd.train.train_local`)."""
    return train_local(c.model, c.x, c.y, c.cfg, seed=c.seed, device=c.device, regularizer=c.regularizer, rule=c.rule)


def unbatchable(model: nn.Module, regularizer: object | None = None, rule: object | None = None) -> str | None:
    """Why ``model``'s local update cannot be batched, or ``None`` when it can."""
    if rule is not None:
        return f"the local-training rule {type(rule).__name__} has no batched form (its clients train one by one)"
    if regularizer is not None and not isinstance(regularizer, FedGenRegularizer):
        return f"the regularizer {type(regularizer).__name__} has no batched form"
    for name, m in model.named_modules():
        label = f"{type(model).__name__}.{name or '<root>'} ({type(m).__name__})"
        if isinstance(m, nn.modules.dropout._DropoutNd) or "Dropout" in type(m).__name__:
            return f"{label} draws random numbers per client"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) or type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d):
                return f"{label} is not a plain BatchNorm1d/2d"
            if m.momentum is None or not m.track_running_stats or not m.affine:
                return f"{label} needs momentum, running statistics and affine weights"
        elif any(True for _ in m.buffers(recurse=False)):
            return f"{label} has buffers outside BatchNorm"
    return None


class _Masked:
    """What the masked BatchNorm layers read and write during one vmapped step."""

    mask: Tensor
    stats: dict[str, Tensor]


class _MaskedBatchNorm(nn.Module):
    """``nn.BatchNorm1d/2d`` in training mode over the valid samples only; the new running
    statistics go to ``ctx.stats`` (returned by the step) instead of being written in place."""

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, name: str, ctx: _Masked) -> None:
        super().__init__()
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.clone())
        self.eps, self.momentum, self.name, self.ctx = bn.eps, float(bn.momentum or 0.0), name, ctx

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        m = self.ctx.mask.view(-1, *([1] * (x.dim() - 1)))
        per_sample = x[0, 0].numel()
        count = self.ctx.mask.sum() * per_sample
        n = count.clamp(min=1)
        mean = (x * m).sum(dims) / n
        xc = x - mean.view(shape)
        var = (xc * xc * m).sum(dims) / n
        out = xc * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        unbiased = var.detach() * n / (n - 1).clamp(min=1)
        mom = self.momentum
        self.ctx.stats[self.name + ".running_mean"] = (1 - mom) * self.running_mean + mom * mean.detach()
        self.ctx.stats[self.name + ".running_var"] = (1 - mom) * self.running_var + mom * unbiased
        return out


class _ContiguousConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose output is made contiguous: vmap runs the clients' convolutions as one
    grouped convolution whose output is a strided view, and the pooling and activations after
    it are up to 2× slower on such a view on CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).contiguous()


def _template(model: nn.Module, ctx: _Masked) -> nn.Module:
    """A copy of ``model`` on the meta device with every BatchNorm masked (same state names)."""
    t = copy.deepcopy(model)
    for name, m in list(t.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                full = f"{name}.{child_name}" if name else child_name
                setattr(m, child_name, _MaskedBatchNorm(child, full, ctx))
            elif type(child) is nn.Conv2d:
                child.__class__ = _ContiguousConv2d
    return t.to("meta")


def _step_loss(
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    extra: dict[str, Tensor],
    *,
    template: nn.Module,
    ctx: _Masked,
    mu: float,
    fedgen: tuple[float, float] | None,
) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
    """One client's loss on one padded batch (vmapped over clients)."""
    ctx.mask, ctx.stats = mask, {}
    logits = functional_call(template, (params, buffers), (x,))
    stats = dict(ctx.stats)
    n = mask.sum().clamp(min=1)
    loss = (F.cross_entropy(logits, y, reduction="none") * mask).sum() / n
    if fedgen is not None:  # FedGenRegularizer.__call__, term by term
        alpha, beta = fedgen
        head = getattr(template, "classifier")  # noqa: B009
        hp = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("classifier.")}
        hb = {k.split(".", 1)[1]: v for k, v in buffers.items() if k.startswith("classifier.")}
        target = F.softmax(functional_call(head, (hp, hb), (extra["f1"],)), dim=1).detach()
        kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none").sum(1)
        latent = beta * (kl * mask).sum() / n
        teacher = alpha * F.cross_entropy(functional_call(head, (hp, hb), (extra["f2"],)), extra["ys"])
        loss = loss + latent + (extra["ys"].shape[0] / n) * teacher
    if mu > 0:
        prox = sum(((params[k] - extra["anchor." + k]) ** 2).sum() for k in params)
        loss = loss + 0.5 * mu * prox
    return loss, (loss.detach(), stats)


def _pad(rows: Sequence[Tensor], width: int, fill: float = 0) -> Tensor:
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def train_group(clients: Sequence[Client]) -> list[float]:
    """Train ``clients`` (one architecture, one recipe) together, in place; return each one's
    mean training loss, as :func:`~fedkd.train.train_local` would."""
    first = clients[0]
    cfg, device = first.cfg, first.device
    ctx = _Masked()
    for c in clients:
        c.model.to(device).train()
    template = _template(first.model, ctx)
    params, buffers = stack_module_state([c.model for c in clients])  # type: ignore[arg-type]
    params = {k: v.detach() for k, v in params.items()}
    n_clients = len(clients)
    plans = [batches(len(c.x), cfg.batch_size, torch.Generator().manual_seed(c.seed), cfg.steps, cfg.epochs)
             for c in clients]  # fmt: skip
    steps = max(len(p) for p in plans)
    if steps == 0:  # nobody has a batch (empty partitions): nothing moves, as one by one
        return [0.0] * len(clients)
    # every client's data in one tensor, and each step's padded batch as one gather from it
    x_all = torch.cat([c.x for c in clients]).to(device)
    y_all = torch.cat([c.y for c in clients]).to(device)
    offsets = [0]
    for c in clients[:-1]:
        offsets.append(offsets[-1] + len(c.x))
    sizes = torch.tensor([[len(p[t]) if t < len(p) else 0 for p in plans] for t in range(steps)])  # (T, N)
    width = int(sizes.max())
    index = torch.zeros(steps, n_clients, width, dtype=torch.long)
    for i, (p, off) in enumerate(zip(plans, offsets, strict=True)):
        for t, idx in enumerate(p):
            index[t, i, : len(idx)] = idx + off
    masks = (torch.arange(width) < sizes.unsqueeze(-1)).to(device=device, dtype=x_all.dtype)  # (T, N, W)
    index = index.to(device)
    anchor = {"anchor." + k: v.clone() for k, v in params.items()} if cfg.proximal_mu > 0 else {}
    momentum = {k: torch.zeros_like(v) for k, v in params.items()} if cfg.momentum > 0 else {}
    losses = []
    regs = [c.regularizer for c in clients]
    fedgen_steps = regs[0].steps if regs[0] is not None else 0
    fns: dict[bool, Callable[..., Any]] = {}
    for t in range(steps):
        all_on = bool((sizes[t] > 0).all())
        active = None if all_on else (sizes[t] > 0).to(device)
        xb, yb, mask = x_all[index[t]], y_all[index[t]], masks[t]
        extra: dict[str, Tensor] = dict(anchor)
        on = t < fedgen_steps
        if on:
            draws = [r.draw(y_all[index[t, i, : int(sizes[t, i])]]) for i, r in enumerate(regs)]  # type: ignore[union-attr]
            extra["f1"] = _pad([d[0] for d in draws], width)
            extra["ys"] = torch.stack([d[1] for d in draws])
            extra["f2"] = torch.stack([d[2] for d in draws])
        if on not in fns:
            fedgen = (regs[0].alpha, regs[0].beta) if on and regs[0] is not None else None
            loss_fn = partial(_step_loss, template=template, ctx=ctx, mu=cfg.proximal_mu, fedgen=fedgen)
            fns[on] = vmap(grad(loss_fn, has_aux=True), randomness="error")
        grads, (loss, stats) = fns[on](params, buffers, xb, yb, mask, extra)
        with torch.no_grad():
            _sgd(params, grads, momentum, active, cfg)
            for k, v in stats.items():
                buffers[k] = v if active is None else torch.where(active.view(-1, *([1] * (v.dim() - 1))), v, buffers[k])
            for k in buffers:
                if k.endswith("num_batches_tracked"):
                    buffers[k] = buffers[k] + (1 if active is None else active.to(buffers[k].dtype))
        losses.append(loss.detach())
    per_step = torch.stack(losses).cpu().double()  # (T, N)
    weights = sizes.double()
    mean_loss = (per_step * weights).sum(0) / weights.sum(0).clamp(min=1)
    with torch.no_grad():
        for i, c in enumerate(clients):
            state = {**{k: v[i] for k, v in params.items()}, **{k: v[i] for k, v in buffers.items()}}
            for k, v in c.model.state_dict().items():
                v.copy_(state[k])
    # train_local seeds torch's global RNG with each client's seed; leave it where the last
    # one-by-one client would, so that whatever the server draws next is the same
    torch.manual_seed(clients[-1].seed)
    return mean_loss.tolist()


def _sgd(
    params: dict[str, Tensor], grads: dict[str, Tensor], momentum: dict[str, Tensor], active: Tensor | None,
    cfg: LocalTrainConfig,
) -> None:  # fmt: skip
    """``torch.optim.SGD``'s update (no dampening, no Nesterov), per client, in place; with
    ``active``, only where it is true."""
    for k, p in params.items():
        g = grads[k]  # a fresh tensor of this step: updated in place
        if cfg.weight_decay:
            g.add_(p, alpha=cfg.weight_decay)
        on = None if active is None else active.view(-1, *([1] * (p.dim() - 1)))
        if momentum:
            buf = momentum[k]
            if on is None:
                g = buf.mul_(cfg.momentum).add_(g)
            else:
                buf.copy_(torch.where(on, buf * cfg.momentum + g, buf))
                g = buf
        if on is None:
            p.add_(g, alpha=-cfg.lr)
        else:
            p.copy_(torch.where(on, p - cfg.lr * g, p))


#: On a CPU, train convolutional models one by one even when batched: vmap runs the clients'
#: convolutions as one grouped convolution, which is 1.5-3x slower than one client's at a time
#: on CPU (benchmarks/RESULTS.md); the benchmarks set it to False to measure that path.
CPU_CONV_ONE_BY_ONE = True


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _width_class(n: int, batch_size: int) -> int:
    """The power of two at or above a client's usual batch (``min(n, batch_size)``)."""
    return 1 << max(min(n, batch_size) - 1, 0).bit_length()


def group_key(c: Client) -> tuple[Any, ...]:
    """Clients with equal keys can be trained together."""
    model = c.model
    shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items())
    r = c.regularizer
    reg = (type(r).__name__, getattr(r, "alpha", None), getattr(r, "beta", None), getattr(r, "steps", None),
           getattr(r, "gen_batch_size", None)) if r is not None else None  # fmt: skip
    return (type(model).__name__, shapes, c.cfg, str(c.device), reg, type(c.rule).__name__)


def train_all(clients: Sequence[Client]) -> tuple[list[float], list[float]]:
    """Train every client: batched by :func:`group_key` where possible, else one by one.

    Returns each client's mean training loss and its share of the compute time (a batched
    group's time divided among its members; a one-by-one client's own time)."""
    losses: list[float] = [0.0] * len(clients)
    seconds: list[float] = [0.0] * len(clients)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(clients):
        # padding costs compute: clients whose batches are of like size train together
        groups.setdefault((*group_key(c), _width_class(len(c.x), c.cfg.batch_size)), []).append(i)
    for members in groups.values():
        first = clients[members[0]]
        reason = unbatchable(first.model, first.regularizer, first.rule)
        if reason is None and first.cfg.classes:
            reason = "a class-continual cross-entropy over the current task's classes has no batched form"
        if reason is None and first.device.type == "cpu" and CPU_CONV_ONE_BY_ONE and _has_conv(first.model):
            reason = (f"{type(first.model).__name__} has convolutions, which are not faster batched on a CPU "
                      "(benchmarks/RESULTS.md, 'Batched clients')")  # fmt: skip
        if reason is not None or len(members) == 1:
            if reason is not None:
                _say_once(reason)
            for i in members:
                t = time.perf_counter()
                losses[i] = train_one(clients[i])
                seconds[i] = time.perf_counter() - t
            continue
        t = time.perf_counter()
        out = train_group([clients[i] for i in members])
        share = (time.perf_counter() - t) / len(members)
        for i, loss in zip(members, out, strict=True):
            losses[i], seconds[i] = loss, share
    return losses, seconds
