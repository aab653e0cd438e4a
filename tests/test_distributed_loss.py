"""The distributed loss equals the single-process loss over the global batch.

Two gloo processes each take half of a global batch. Their loss values and their
rank-averaged parameter gradients (what DDP and FSDP2 apply) must equal those of one
process on the whole batch.
"""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from composer_clip.one_to_many_loss import MultiEncoderClipLoss, OneToManyClipLoss

WORLD_SIZE = 2
GLOBAL_BATCH = 8
NUM_TOWERS = 3
AGGREGATIONS = [('mean', False), ('max', False), ('weighted', False), ('weighted', True), ('pairwise', False)]
MODES = [(loss, *aggregation) for loss in ('one_to_many', 'multi_encoder') for aggregation in AGGREGATIONS]


class TinyTowers(nn.Module):
    """Two text projections, NUM_TOWERS vision projections and a log logit scale."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.text = nn.Parameter(torch.randn(2, 12, 8, generator=generator, dtype=torch.float64))
        self.vision = nn.Parameter(torch.randn(NUM_TOWERS, 10, 8, generator=generator, dtype=torch.float64))
        self.log_scale = nn.Parameter(torch.tensor(2.5, dtype=torch.float64))

    def forward(self, texts, images):
        text_features = [F.normalize(texts @ self.text[n], dim=-1) for n in range(2)]
        vision_features = [F.normalize(images @ self.vision[n], dim=-1) for n in range(NUM_TOWERS)]
        return text_features, vision_features, self.log_scale.exp()


def global_inputs():
    generator = torch.Generator().manual_seed(1)
    texts = torch.randn(GLOBAL_BATCH, 12, generator=generator, dtype=torch.float64)
    images = torch.randn(GLOBAL_BATCH, 10, generator=generator, dtype=torch.float64)
    return texts, images


def loss_and_grads(rank, world_size, loss_kind, aggregation, learnable):
    towers = TinyTowers()
    common = {'aggregation': aggregation, 'learnable_weights': learnable, 'rank': rank, 'world_size': world_size}
    if loss_kind == 'one_to_many':
        loss_fn = OneToManyClipLoss(num_multi_encoders=NUM_TOWERS, **common).double()
        aggregators = [loss_fn.aggregator]
    else:
        loss_fn = MultiEncoderClipLoss(NUM_TOWERS, 2, **common).double()
        aggregators = [loss_fn.vision_aggregator, loss_fn.text_aggregator]
    if learnable:
        with torch.no_grad():
            for aggregator in aggregators:
                aggregator.weight_logits.copy_(torch.tensor([0.3, -0.7, 1.1][:aggregator.num_encoders]))

    texts, images = global_inputs()
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    text_features, vision_features, logit_scale = towers(texts[local], images[local])
    if loss_kind == 'one_to_many':
        loss = loss_fn(text_features[0], vision_features, logit_scale)
    else:
        loss = loss_fn(vision_features, text_features, logit_scale)
    loss.backward()

    parameters = [p for p in list(towers.parameters()) + list(loss_fn.parameters()) if p.grad is not None]
    grads = [p.grad.clone() for p in parameters]
    if world_size > 1:
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world_size
    return loss.detach(), grads


def run_rank(rank, port, results):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE)
    try:
        for mode in MODES:
            results[(rank, *mode)] = loss_and_grads(rank, WORLD_SIZE, *mode)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_distributed_loss_matches_global_batch():
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(run_rank, args=(free_port(), results), nprocs=WORLD_SIZE, start_method='spawn')

    for mode in MODES:
        expected_loss, expected_grads = loss_and_grads(0, 1, *mode)
        for rank in range(WORLD_SIZE):
            loss, grads = results[(rank, *mode)]
            torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
            assert len(grads) == len(expected_grads)
            for grad, expected in zip(grads, expected_grads):
                torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
