"""Run under torchrun by tests/test_pipeline.py: sparsity-train on the synthetic set and save each
rank's BN gammas, so the test can compare ranks with each other and with one process."""

import os
import sys

import torch
from torch.utils.data import DistributedSampler

from slimcore import models
from slimcore.pipeline import data
from slimcore import bn_weights
from slimcore.pipeline.train import Settings, distributed, fit, model_meta


def main(out_dir, world_batch, accumulate, mode):
    rank, world = distributed()
    torch.manual_seed(0)
    train, _, test, spec = data.datasets("synthetic")
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = data.Loader(train, spec, world_batch // world, train=True, sampler=sampler, seed=0)
    model = models.build("lenet5", in_channels=1, input_size=28)
    s = Settings(epochs=2, batch_size=world_batch // world, lam=1e-3, mode=mode, accumulate=accumulate, quiet=True)
    fit(model, loader, None, None, s, os.path.join(out_dir, f"stage-{world}"), model_meta("lenet5", {}, "synthetic",
        [1, 28, 28]), torch.device("cpu"))
    gammas = torch.cat([w.detach().flatten() for _, w in bn_weights(model)])
    torch.save(gammas, os.path.join(out_dir, f"gamma-world{world}-rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
