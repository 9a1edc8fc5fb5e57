"""Retrieval fine-tuning with rank-local ITM negatives (`train.negative_all_rank: false`, the
original's Flickr30k setting) on 2 gloo ranks: each rank's negatives index its own batch, and its
losses and gradients equal a one-process run on that rank's batch with the same negatives (no
image embeddings cross ranks), while the queues still receive the whole world batch."""
import os
import tempfile

import pytest
import torch

from blipfast.models.retrieval import BlipForRetrieval
from tests.dist.train_common import make_batch, tiny_model_config

B = 3


def _inputs(rank: int):
    b = make_batch(0, 0, rank)
    return b["images"][:B], b["input_ids"][:B], b["attention_mask"][:B], torch.tensor([0, 1, 0]) + 10 * rank


def _model(all_rank: bool):
    torch.manual_seed(0)
    return BlipForRetrieval(tiny_model_config(queue_size=12), negative_all_rank=all_rank)


def _worker(rank, store, q):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = _model(False)
        images, ids, mask, idx = _inputs(rank)
        out = model(images, ids, mask, alpha=0.4, idx=idx)
        out.loss.backward()
        # numpy, not tensors: a tensor sent through the queue lives in this process's shared memory
        grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
        q.put((rank, [n.tolist() for n in out.negatives], float(out.loss_itc.detach()),
               float(out.loss_itm.detach()), grads, model.idx_queue.reshape(-1).tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_local_negatives_two_ranks_equal_one_process_per_rank():
    import torch.multiprocessing as mp

    # a file store, not a TCP port: a port picked here could be taken before the workers bind it
    store = os.path.join(tempfile.mkdtemp(), "store")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, store, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r[0]: r[1:] for r in (q.get(timeout=180) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, (negs, itc, itm, grads, idx_queue) in results.items():
        _, _, _, idx = _inputs(rank)
        for neg in negs:  # local indices, never the same image id
            assert all(0 <= j < B and idx[j] != idx[i] for i, j in enumerate(neg))
        # The queue got both ranks' image ids (rank-major), as with world-batch negatives.
        assert idx_queue[:2 * B] == [0, 1, 0, 10, 11, 10]
        one = _model(False)
        images, ids, mask, idx = _inputs(rank)
        out = one(images, ids, mask, alpha=0.4, idx=idx, negatives=tuple(torch.tensor(n) for n in negs))
        out.loss.backward()
        assert abs(float(out.loss_itc.detach()) - itc) < 1e-6 and abs(float(out.loss_itm.detach()) - itm) < 1e-6
        for k, p in one.named_parameters():
            if p.grad is not None:
                assert torch.allclose(p.grad, torch.from_numpy(grads[k]), rtol=1e-5, atol=1e-7), k
