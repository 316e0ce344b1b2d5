"""DistributedDataParallel (gloo, 2 CPU processes) trains a model built on
fastvision ops exactly like one process on the whole batch."""

import torch

from fastvision.ops import Mamba
from fastvision.testing import check_ddp_matches_single_process


def build_bimamba():
    return Mamba(d_model=8, d_state=4, expand=2, bimamba_type="v2", if_divide_out=True)


def build_mamba():
    return Mamba(d_model=8, d_state=4, expand=2)


def mamba_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 13, 8, generator=g)
    return x, torch.sin(x.cumsum(1))


def test_ddp_bimamba_matches_single_process():
    check_ddp_matches_single_process(build_bimamba, mamba_batch, steps=3)


def test_ddp_mamba_matches_single_process():
    check_ddp_matches_single_process(build_mamba, mamba_batch, steps=2)


def build_na():
    from fastvision.ops import NeighborhoodAttention2D
    return torch.nn.Sequential(NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, dilation=2),
                               torch.nn.Linear(8, 8))


def na_batch(step):
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(4, 7, 7, 8, generator=g)
    return x, torch.tanh(x.flip(1))


def test_ddp_neighborhood_attention_matches_single_process():
    check_ddp_matches_single_process(build_na, na_batch, steps=3)
