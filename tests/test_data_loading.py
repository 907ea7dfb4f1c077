"""Loaders resume at the same batch: the rest of an epoch after `set_epoch(loader, epoch, skip)` is exactly what an
uninterrupted loader gives, random masking and augmentation included, with workers, and sharded as Fabric shards it."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from nbtrain.errors import DataError
from nbtrain.data import (build_data, data_settings, make_loader, set_epoch, loader_sampler, EpochSampler, DictDataset,
                          collate_stack)
from nbtrain.embedded import digits_images, save_image_folder

def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x: assert torch.equal(x[k], y[k]), k

def run(loader, epochs):
    "Batches of whole epochs, as the trainer reads them: set_epoch, then one pass."
    out = []
    for e in epochs:
        set_epoch(loader, e)
        out.append(list(loader))
    return out

@pytest.fixture(scope='module')
def bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('data')
    cfg = lambda **kw: data_settings(None, cache_dir=str(tmp/'cache'), **kw)
    x, y = digits_images()
    save_image_folder(tmp/'imgs', x[:48], y[:48] % 3, size=16, mode='RGB')
    return {'causal_lm': build_data(cfg(corpus_size=40, seq_len=32), 'causal_lm', 0),
            'masked_lm': build_data(cfg(corpus_size=40, seq_len=32), 'masked_lm', 0),
            'image_classification': build_data(cfg(source=str(tmp/'imgs'), augment=True), 'image_classification', 0)}

@pytest.mark.parametrize('task', ['causal_lm', 'masked_lm', 'image_classification'])
@pytest.mark.parametrize('workers', [0, 2])
def test_resumed_loader_yields_the_same_batches(bundles, task, workers):
    b = bundles[task]
    mk = lambda: make_loader(b.train, 4, shuffle=True, seed=11, collate=b.collate, num_workers=workers)
    ref = run(mk(), [0, 1, 2])
    n = len(ref[0])
    for epoch, skip in ((0, 0), (1, 3), (1, n - 1), (2, 1)):
        loader = mk()
        set_epoch(loader, epoch, skip=skip)
        rest = list(loader)            # the rest of the interrupted epoch
        nxt = run(loader, [epoch + 1])[0] if epoch < 2 else None  # and the next one, as the trainer would continue
        same(rest, ref[epoch][skip:])
        if nxt is not None: same(nxt, ref[epoch + 1])
    if task != 'causal_lm':  # the random part differs between epochs (new masks / augmentations), not between runs
        assert not all(torch.equal(p[k], q[k]) for p, q in zip(ref[0], ref[1]) for k in p)

class Reads(Dataset):
    def __init__(self, n): self.n, self.read = n, 0
    def __len__(self): return self.n
    def __getitem__(self, i): self.read += 1; return {'x': torch.tensor(i)}

def test_skipped_batches_are_not_loaded():
    ds = Reads(1000)
    loader = make_loader(ds, 10, shuffle=True, seed=0, collate=collate_stack)
    set_epoch(loader, 3, skip=95)
    assert len(list(loader)) == 5 and ds.read == 50

def test_sampler_state_round_trip_and_data_change():
    s = EpochSampler(100, seed=4)
    s.set_epoch(2, start=40)
    t = EpochSampler(100, seed=4)
    t.load_state_dict(s.state_dict())
    assert list(t) == list(s)
    assert t.state_dict() == dict(epoch=3, start=0, n=100, seed=4, shuffle=True)
    with pytest.raises(DataError, match='the data changed since the checkpoint'):
        EpochSampler(99, seed=4).load_state_dict(s.state_dict())
    with pytest.raises(DataError, match='Cannot start epoch 1 at position 101'):
        s.set_epoch(1, start=101)

@pytest.mark.parametrize('world', [2, 3])
def test_distributed_shards_resume_at_their_own_batch(world):
    "Fabric wraps our sampler in Lightning's DistributedSamplerWrapper and sets its epoch on each pass."
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning_fabric.utilities.data import _set_sampler_epoch
    ds = DictDataset(x=torch.arange(60))
    def shard(rank):
        base = make_loader(ds, 2, shuffle=True, seed=3, collate=collate_stack)
        return DataLoader(base.dataset, batch_size=2, collate_fn=base.collate_fn, drop_last=True,
                          sampler=DistributedSamplerWrapper(base.sampler, num_replicas=world, rank=rank, shuffle=False))
    for rank in range(world):
        whole = shard(rank)
        set_epoch(whole, 1); _set_sampler_epoch(whole, 1)
        ref = [b['x'].tolist() for b in whole]
        part = shard(rank)
        assert loader_sampler(part)[1] == world
        set_epoch(part, 1, skip=4); _set_sampler_epoch(part, 1)  # Fabric's own set_epoch must not undo the skip
        steps = 60 // world // 2
        assert [b['x'].tolist() for b in part][:steps - 4] == ref[4:steps]
    def epoch0(rank):
        loader = shard(rank)
        set_epoch(loader, 0)
        return [v for b in loader for v in b['x'].tolist()]
    assert sorted(v for r in range(world) for v in epoch0(r)) == list(range(60))  # each sample once per epoch, overall

def test_set_epoch_needs_our_loader():
    with pytest.raises(DataError, match='set_epoch needs a loader from make_loader'):
        set_epoch(DataLoader(DictDataset(x=torch.arange(4))), 0)
