"""The training step of --parallel hybrid's sequential schedule (Krizhevsky 2014, Figure 2;
cuda-convnet2's MultiGPU.md): the convolutional layers run once on each process's b images,
then the fully connected layers run K times, once on each process's images in rank order,
and update after every pass (--fc-updates each, cuda-convnet2's updatePeriod 1) or once
after the last (--fc-updates once, updatePeriod K: the same gradients as the gather
schedule and as DDP). The schedule 'gather' needs no step of its own: ``loop.train_step``
runs it as any network, then sums the convolutional gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from split_alexnet.network.hybrid import HybridAlexNet, broadcast_rows, start_broadcast


def sequential_step(net: HybridAlexNet, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor, fc_updates: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on this process's images ``x`` (b, 3, 227, 227) and labels ``y``; every
    process calls it together. Returns this process's (loss, logits) from the pass on its
    own images, on the device, without a host sync (the batch sizes are exchanged on the
    host group).

    Pass j: process j's pool5 and labels are broadcast (all K broadcasts start before the
    first pass, on ``net.ahead_group``, so that they overlap the passes' computation), every
    process computes fc6-fc8 on them (its units) and the same loss (the mean over process
    j's images), backward, and process j receives the gradient of its pool5, summed over
    the processes (a reduce on the same group, in the backward). The
    convolutional layers' backward runs once after the K passes, and their gradients are
    averaged across processes (each pass's loss is one process's mean: the average is the
    mean over all K*b images)."""
    k, group, rank = net.parts, net.group, net.rank
    ahead = net.ahead_group if net.ahead_group is not None else group
    sizes = net.sizes(x.shape[0])
    pool5 = net.features(x)                                           # (b, 9216)
    mine = pool5.detach().requires_grad_(True)
    # Every pass's pool5 and labels start on their way now, on their own group: pass j
    # computes while the later passes' inputs arrive.
    rows = [mine.detach() if j == rank else pool5.new_empty((sizes[j], pool5.shape[1]))
            for j in range(k)]
    labels = [y if j == rank else y.new_empty((sizes[j],)) for j in range(k)]
    arriving = [(start_broadcast(rows[j], ahead, j), start_broadcast(labels[j], ahead, j))
                for j in range(k)]
    own: tuple[torch.Tensor, torch.Tensor] | None = None
    for j in range(k):
        # every process's input requires grad, so that every process runs the reduce of
        # the broadcast's backward (only process j's receives the sum)
        src = mine if j == rank else pool5.new_empty((0,)).requires_grad_(True)
        h = broadcast_rows(src, rows[j], arriving[j][0], ahead, j)   # (b_j, 9216)
        arriving[j][1].wait()
        logits = net.classifier(h, mean=True)                        # (b_j, classes)
        loss = F.cross_entropy(logits, labels[j])  # the same in every process
        loss.backward()
        if j == rank:
            own = (loss.detach(), logits.detach())
        if fc_updates == "each":  # only fc6-fc8 hold gradients now: only they move
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    pool5.backward(mine.grad)
    net.reduce_conv_grads(mean=True)
    if fc_updates == "once":  # K passes' gradients summed: their mean, as one pass of K*b
        for p in net.fc_parameters():
            if p.grad is not None:
                p.grad /= k
    optimizer.step()  # with "each", the convolutional layers only
    assert own is not None
    return own
