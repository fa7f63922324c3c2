"""The prediction engine and the local runner's read-ahead, below ``restore``."""

import json
import threading

import numpy as np
import pytest
import zarr

from pssr.blockwise import store
from pssr.blockwise.engine import (
    Job,
    Predictor,
    block_reads,
    input_digest,
    process_blocks,
    read_block,
    run_group,
)
from pssr.blockwise.inputs import Input
from pssr.blockwise.predict import restore
from pssr.blockwise.runners import Prefetch
from pssr.blockwise.tiling import group_blocks, plan_blocks
from pssr.nn.modelfile import load_model


def _job(lm, shape, tmp_path, frames=1, ctx=None, **kw):
    base = dict(
        input="<memory>", input_axes="ZYX", input_array=None, model="m", scale=lm.scale, frames=frames,
        context_axis=ctx, lo=0.0, hi=255.0, full_scale=255.0, tile=32, halo=lm.halo,
        out=str(tmp_path / "w.zarr"), out_dtype="float32",
    )  # fmt: skip
    base.update(kw)
    return Job(**base)


def test_job_round_trips_and_names_what_changed(model_path, tmp_path):
    lm = load_model(model_path)
    job = _job(lm, (2, 64, 64), tmp_path)
    again = Job(**json.loads(job.to_json()))
    assert again == job
    old = json.loads(job.to_json())
    # Where the work runs and where the output lies do not change the work.
    moved = _job(lm, (2, 64, 64), tmp_path / "elsewhere", device="cuda")
    assert moved.same_work(old)
    other = _job(lm, (2, 64, 64), tmp_path, tile=16, tta=True)
    assert other.differences(old) == {"tile": (32, 16), "tta": (False, True)}


def test_neighbour_frames_are_read_mirrored_at_the_ends(model_path, tmp_path):
    lm = load_model(model_path)
    vol = np.arange(4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16)
    job = _job(lm, vol.shape, tmp_path, frames=3, ctx=0, tile=16)
    b = next(b for b in plan_blocks(vol.shape, 16, lm.halo) if b.plane == (0,))
    assert [idx[0] for idx in block_reads(vol.shape, job, b)] == [1, 0, 1]
    np.testing.assert_array_equal(read_block(vol, job, b), vol[[1, 0, 1]][:, : b.read[1], : b.read[3]])
    last = next(b for b in plan_blocks(vol.shape, 16, lm.halo) if b.plane == (3,))
    assert [idx[0] for idx in block_reads(vol.shape, job, last)] == [2, 3, 2]


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_one_batch_equals_the_whole_restoration(model_path, em_lr, tmp_path):
    """process_blocks + write_block over every batch gives restore()'s bytes, with checksummed markers."""
    lm = load_model(model_path)
    vol = em_lr[:2, :64, :80]
    lo, hi, fs = Input.open(vol, "ZYX").normalisation(lm)  # what restore() computes
    job = _job(lm, vol.shape, tmp_path, lo=lo, hi=hi, full_scale=fs)
    store.create_store(tmp_path / "w.zarr", job, vol.shape)
    group = zarr.open_group(job.out, mode="r+")
    pred = Predictor(lm)
    blocks = plan_blocks(vol.shape, job.tile, job.halo, lm.config.multiple)
    for g in group_blocks(blocks, job.batch):
        stats = run_group(vol, pred, job, g, set(), group)
        assert [s["key"] for s in stats] == [b.key for b in g]
    done = store.done_blocks(job.out)
    assert set(done) == {b.key for b in blocks}
    assert all(done[b.key]["input"] == input_digest(vol, job, b) for b in blocks)
    # Every marker's checksum matches what is stored.
    assert all(store.check_block(group, job, b, done[b.key]) is None for b in blocks)
    # The same numbers restore() computes from the same normalisation.
    res = process_blocks(vol, pred, job, blocks[:1])[0]
    np.testing.assert_array_equal(np.asarray(group["s0"][blocks[0].out_slices(job.scale)]), res["out"])
    # (the same backend as the Predictor above: restore's default may be ONNX Runtime on the CPU)
    whole = restore(
        vol, model=model_path, tile=32, dtype="float32", empty_threshold=0, backend="torch", progress=False
    )
    np.testing.assert_array_equal(whole.output, np.asarray(group["s0"][...]))


@pytest.mark.slow  # over 4 s on 2 cores: the full suite (CI) runs it
def test_a_batch_written_by_a_thread_pool_equals_one_thread(model_path, em_lr, tmp_path, monkeypatch):
    # What a GPU dask worker does (pssr.blockwise.distributed._write_pool): the same bytes and markers.
    from concurrent.futures import ThreadPoolExecutor

    from pssr.blockwise import distributed

    lm = load_model(model_path)
    vol = em_lr[:2, :64, :80]
    outs = {}
    for name, pool in (("serial", None), ("pool", ThreadPoolExecutor(3))):
        d = tmp_path / name
        d.mkdir()
        job = _job(lm, vol.shape, d)
        store.create_store(d / "w.zarr", job, vol.shape)
        group = zarr.open_group(job.out, mode="r+")
        blocks = plan_blocks(vol.shape, job.tile, job.halo, lm.config.multiple)
        pred = Predictor(lm)
        for g in group_blocks(blocks, job.batch):
            stats = run_group(vol, pred, job, g, {blocks[1].key}, group, pool=pool)
            assert [s["key"] for s in stats] == [b.key for b in g if b.key != blocks[1].key]
        done = store.done_blocks(job.out)
        outs[name] = (np.asarray(group["s0"][...]), {k: v["digest"] for k, v in done.items()})
    np.testing.assert_array_equal(outs["pool"][0], outs["serial"][0])
    assert outs["pool"][1] == outs["serial"][1]
    monkeypatch.setenv("PSSR_IO_THREADS", "3")
    monkeypatch.setattr(distributed, "_POOL", None)
    assert distributed._write_pool("cpu") is None  # CPU workers already fill the cores
    gpu_pool = distributed._write_pool("cuda:0")
    assert gpu_pool._max_workers == 3
    # One pool per worker process, whatever the job: a task of another job arriving while one
    # is writing must not shut the pool that task holds (adversarial test F1).
    assert distributed._write_pool("cuda:0") is gpu_pool
    assert gpu_pool.submit(lambda: 7).result() == 7
    gpu_pool.shutdown()


def test_block_results_are_the_same_on_any_number_of_threads(model_path, em_lr, tmp_path):
    from pssr.blockwise.fidelity import noise_spec

    lm = load_model(model_path)
    vol = em_lr[:1, :160, :200]
    job = _job(
        lm, vol.shape, tmp_path, tta=True, fidelity=True, out_dtype="uint8",
        noise=noise_spec("model", lm.crappifier, vol),
    )  # fmt: skip
    blocks = plan_blocks(vol.shape, job.tile, job.halo, lm.config.multiple)
    g = max(group_blocks(blocks, 8), key=len)
    assert len(g) >= 2
    pred = Predictor(lm, tta=True)
    one = process_blocks(vol, pred, job, g, post_threads=1)
    many = process_blocks(vol, pred, job, g, post_threads=5)
    for a, b in zip(one, many, strict=True):
        assert a["stats"] == b["stats"] and set(a) == set(b) == {"out", "stats", "fidelity", "uncertainty"}
        for k in ("out", "fidelity", "uncertainty"):
            np.testing.assert_array_equal(a[k], b[k])


def test_a_non_finite_network_output_is_an_error_not_an_output(model_path, em_lr, tmp_path):
    from pssr.errors import PredictError

    lm = load_model(model_path)
    vol = em_lr[:1, :64, :64]
    job = _job(lm, vol.shape, tmp_path, out_dtype="uint8")
    blocks = plan_blocks(vol.shape, job.tile, job.halo, lm.config.multiple)
    g = max(group_blocks(blocks, 8), key=len)
    pred = Predictor(lm)
    real = pred.__call__

    def broken(x):
        ys, spread = real(x)
        ys[-1, 3, 3] = np.nan  # the last block of the batch
        return ys, spread

    with pytest.raises(PredictError, match=r"output is NaN or infinite on the block at .*model file may be"):
        process_blocks(vol, _Calls(broken, pred), job, g)


class _Calls:
    """A predictor stand-in: ``fn`` computes, the other attributes are the real predictor's."""

    def __init__(self, fn, pred):
        self.fn, self.pred = fn, pred

    def __call__(self, x):
        return self.fn(x)

    def __getattr__(self, name):
        return getattr(self.pred, name)


def test_skipped_blocks_are_computed_but_not_written(model_path, em_lr, tmp_path):
    lm = load_model(model_path)
    vol = em_lr[:1, :64, :64]
    job = _job(lm, vol.shape, tmp_path)
    store.create_store(tmp_path / "w.zarr", job, vol.shape)
    group = zarr.open_group(job.out, mode="r+")
    blocks = plan_blocks(vol.shape, job.tile, job.halo, lm.config.multiple)
    stats = run_group(vol, Predictor(lm), job, blocks, {blocks[0].key}, group)
    assert [s["key"] for s in stats] == [b.key for b in blocks[1:]]
    assert blocks[0].key not in store.done_blocks(job.out)


def test_verified_done_redoes_a_block_whose_input_changed(model_path, em_lr, tmp_path):
    lm = load_model(model_path)
    vol = em_lr[:1, :64, :64].copy()
    job = _job(lm, vol.shape, tmp_path)
    store.create_store(tmp_path / "w.zarr", job, vol.shape)
    group = zarr.open_group(job.out, mode="r+")
    blocks = plan_blocks(vol.shape, job.tile, job.halo, lm.config.multiple)
    run_group(vol, Predictor(lm), job, blocks, set(), group)
    vol[0, 40:44, 40:44] += 1  # only the last block reads this
    good = store.verified_done(
        group, job, blocks, store.done_blocks(job.out), lambda b: input_digest(vol, job, b)
    )
    changed = {b.key for b in blocks if not (b.read[1] <= 40 or b.read[3] <= 40)}
    assert changed and set(good) == {b.key for b in blocks} - changed
    assert set(store.done_blocks(job.out)) == set(good)  # their markers are gone: they will be redone


class _CountingArray:
    """An array that records which regions are read, from which thread."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []

    def __getitem__(self, idx):
        self.reads.append((idx, threading.current_thread().name))
        return self.a[idx]


def _keys(shape, job, batches):
    return {
        tuple((s.start, s.stop) if isinstance(s, slice) else s for s in idx)
        for g in batches
        for b in g
        for idx in block_reads(shape, job, b)
    }


@pytest.mark.parametrize("frames", [1, 3])
def test_prefetch_returns_the_same_data_one_batch_ahead(model_path, tmp_path, frames):
    lm = load_model(model_path)
    vol = np.random.default_rng(0).random((3, 48, 48)).astype(np.float32)
    job = _job(lm, vol.shape, tmp_path, frames=frames, ctx=0 if frames > 1 else None, tile=16, batch=2)
    batches = group_blocks(plan_blocks(vol.shape, 16, job.halo, lm.config.multiple), 2)
    assert len(batches) > 3
    arr = _CountingArray(vol)
    reader = Prefetch(arr, job, batches)
    try:
        for i, batch in enumerate(batches):
            reader.start(i)
            for b in batch:
                np.testing.assert_array_equal(read_block(reader, job, b), read_block(vol, job, b))
            if reader._next is not None:
                reader._next.result()  # let the read-ahead finish, then look at what it read
            read = {
                tuple((s.start, s.stop) if isinstance(s, slice) else s for s in idx) for idx, _ in arr.reads
            }
            assert read <= _keys(vol.shape, job, batches[: i + 2])  # never more than one batch ahead
    finally:
        reader.close()
    assert any(t.startswith("pssr-prefetch") for _, t in arr.reads)


def test_a_background_block_beside_data_is_restored_not_filled():
    # Found by the adversarial probe: a block whose core is all background but whose halo holds
    # data was written as a constant (the core's range was below --empty-threshold), so the
    # output next to every tile-aligned data boundary was wrong and verify could not tell.
    from pssr import restore

    img = np.zeros((1, 128, 128), np.uint8)
    img[0, :, 64:] = np.linspace(20, 250, 64, dtype=np.uint8)[None, :]  # data starts on a block edge
    kw = dict(model="bilinear:4", axes="ZYX", tile=64, progress=False)
    filled = restore(img, empty_threshold=0.01, **kw)
    exact = restore(img, empty_threshold=0.0, **kw)
    np.testing.assert_array_equal(filled.output, exact.output)
    # and a block that reads nothing but background is still filled
    bg = restore(np.zeros((1, 128, 128), np.uint8), empty_threshold=0.01, **kw)
    assert not bg.output.any()
