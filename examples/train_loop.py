"""tetrad's Engine inside a hand-written training loop.

    torchrun --nproc_per_node 2 examples/train_loop.py      # or: python examples/train_loop.py

The model, optimizer and data are the user's own; tetrad only handles the parallel layout.
"""

import torch
import torch.distributed as dist

import tetrad
from tetrad.data import GlobalBatchSampler, TokenDataset, builtin_tokens, shard_indices
from tetrad.models import Transformer
from tetrad.models.args import ModelArgs
from tetrad.models.loss import cross_entropy

GLOBAL_BATCH, MICRO_BATCH, STEPS = 16, 4, 30

model = Transformer(ModelArgs(arch="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                              n_kv_heads=2, seq_len=64), seed=0)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
engine = tetrad.parallelize(model, optimizer=optimizer,
                            strategy={"dp": "auto", "micro_batch_size": MICRO_BATCH},
                            global_batch_size=GLOBAL_BATCH)

dataset = TokenDataset(builtin_tokens(200_000, seed=0), seq_len=64)
sampler = GlobalBatchSampler(len(dataset), GLOBAL_BATCH, seed=0)
for step in range(STEPS):
    # This rank's share of the global batch, fed micro-batch by micro-batch.
    local = shard_indices(sampler.next_indices(), engine.dp_rank, engine.layout.dp)
    inputs, labels = dataset.get_batch(local)
    for x, y in zip(inputs.split(MICRO_BATCH), labels.split(MICRO_BATCH)):
        loss = cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()  # updates the weights only after the last micro-batch of the global batch
    if dist.get_rank() == 0 and step % 10 == 0:
        print(f"step {step} micro-batch loss {loss.item():.4f}")
dist.destroy_process_group()
