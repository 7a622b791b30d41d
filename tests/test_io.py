"""Shard files and their merge: packed (shuffled + deflated) rows compressed by threads and copied as they
are, against h5py's own filter pipeline."""
import h5py
import numpy as np
import pytest

from transfgu.shards import COMPRESSION, ShardWriter, merge_batches, shuffle_deflate, write_batch


def gradient_like(rng, n, K=5, h=4):
    """Like the pseudo stage's gradient term: -1, 0 and small positive float16 values."""
    g = rng.random((n, K, h, h))
    return np.where(g < 0.5, -1.0, np.where(g < 0.7, 0.0, g * 1e-3)).astype(np.float16)


def test_a_packed_chunk_reads_back_through_hdf5s_own_filters(tmp_path):
    row = gradient_like(np.random.default_rng(0), 1)[0]
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        ds = h5.create_dataset("g", shape=(1, *row.shape), dtype=row.dtype, chunks=(1, *row.shape), **COMPRESSION)
        ds.id.write_direct_chunk((0, 0, 0, 0), shuffle_deflate(row))
        ref = h5.create_dataset("ref", data=row[None], chunks=(1, *row.shape), **COMPRESSION)
        ref_mask, ref_chunk = ref.id.read_direct_chunk((0, 0, 0, 0))
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        np.testing.assert_array_equal(h5["g"][0], row)
    assert ref_mask == 0 and len(shuffle_deflate(row)) < row.nbytes
    # the same shuffled byte planes as HDF5's filter (inflating both gives the same bytes)
    import zlib
    assert zlib.decompress(shuffle_deflate(row)) == zlib.decompress(ref_chunk)


def write_shards(folder, batches, n_shards, packed):
    paths = [folder / f"rank{r}.h5" for r in range(n_shards)]
    writers = [ShardWriter(p, packed=["gradient"], threads=2, depth=1) if packed else None for p in paths]
    files = [None if packed else h5py.File(p, "w") for p in paths]
    for b, arrays in enumerate(batches):
        r = b % n_shards
        if packed:
            writers[r].write(b, arrays)
        else:
            write_batch(files[r], b, arrays)
    for w in writers + files:
        if w is not None:
            w.close()
    return paths


@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_packed_shards_merge_to_the_same_values_and_bytes(tmp_path, n_shards):
    rng = np.random.default_rng(1)
    sizes = [4, 4, 0, 3, 4]  # an empty batch too
    batches = [{"attention": rng.random((n, 4, 4)).astype(np.float32), "gradient": gradient_like(rng, n)}
               for n in sizes]
    sizes = {}
    for packed in (True, False):
        folder = tmp_path / f"{n_shards}-{packed}"
        folder.mkdir()
        paths = write_shards(folder, batches, n_shards, packed)
        if packed:
            with h5py.File(paths[0], "r") as h5:
                ds = h5["batch0/gradient"]
                assert ds.chunks == (1, 5, 4, 4) and ds.compression == "gzip" and ds.shuffle
        out = folder / "merged.h5"
        with h5py.File(out, "w") as h5:
            merge_batches(paths, len(batches), h5, {"attention": 1, "gradient": 1}, compressed=["gradient"])
        with h5py.File(out, "r") as h5:
            np.testing.assert_array_equal(h5["gradient"][...], np.concatenate([b["gradient"] for b in batches]))
            np.testing.assert_array_equal(h5["attention"][...], np.concatenate([b["attention"] for b in batches]))
            assert h5["gradient"].compression == "gzip" and h5["gradient"].chunks == (1, 5, 4, 4)
        sizes[packed] = out.stat().st_size
    # the packed rows take about as much room as h5py's own compression of the same data (zlib builds differ)
    assert abs(sizes[True] - sizes[False]) <= 0.05 * sizes[False]


def test_merged_file_bytes_do_not_depend_on_the_number_of_shards(tmp_path):
    rng = np.random.default_rng(2)
    batches = [{"gradient": gradient_like(rng, n)} for n in (3, 3, 2, 3)]
    files = []
    for n_shards in (1, 2):
        folder = tmp_path / str(n_shards)
        folder.mkdir()
        paths = write_shards(folder, batches, n_shards, packed=True)
        with h5py.File(folder / "m.h5", "w") as h5:
            merge_batches(paths, len(batches), h5, {"gradient": 1}, compressed=["gradient"])
        files.append((folder / "m.h5").read_bytes())
    assert files[0] == files[1]


def test_compressed_arrays_must_be_chunked_by_row(tmp_path):
    paths = write_shards(tmp_path, [{"gradient": gradient_like(np.random.default_rng(3), 4)}], 1, packed=False)
    with h5py.File(tmp_path / "m.h5", "w") as h5, pytest.raises(ValueError, match="one row per chunk"):
        merge_batches(paths, 1, h5, {"gradient": 2}, compressed=["gradient"])
