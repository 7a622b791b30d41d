"""Piece files and their merge: packed (shuffled + deflated) rows compressed by threads and copied as they
are, against h5py's own filter pipeline; atomic outputs."""
import h5py
import numpy as np
import pytest

from transfgu.io import atomic_output
from transfgu.pieces import COMPRESSION, PieceWriter, merge_batches, piece_name, shuffle_deflate, write_piece


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


def write_pieces(folder, batches, n_writers, packed):
    """Batch b written by writer b % n_writers (as rank b % world would), packed by threads or plain."""
    writers = [PieceWriter(folder, packed=["gradient"], threads=2, depth=1) for _ in range(n_writers)]
    for b, arrays in enumerate(batches):
        if packed:
            writers[b % n_writers].write(b, arrays)
        else:
            write_piece(folder / piece_name(b), arrays)
    for w in writers:
        w.close()
    return [folder / piece_name(b) for b in range(len(batches))]


@pytest.mark.parametrize("n_writers", [1, 2, 3])
def test_packed_pieces_merge_to_the_same_values_and_bytes(tmp_path, n_writers):
    rng = np.random.default_rng(1)
    sizes = [4, 4, 0, 3, 4]  # an empty batch too
    batches = [{"attention": rng.random((n, 4, 4)).astype(np.float32), "gradient": gradient_like(rng, n)}
               for n in sizes]
    sizes = {}
    for packed in (True, False):
        folder = tmp_path / f"{n_writers}-{packed}"
        folder.mkdir()
        paths = write_pieces(folder, batches, n_writers, packed)
        if packed:
            with h5py.File(paths[0], "r") as h5:
                ds = h5["gradient"]
                assert ds.chunks == (1, 5, 4, 4) and ds.compression == "gzip" and ds.shuffle
        assert sorted(p.name for p in folder.iterdir()) == [p.name for p in paths]  # no temporary file left
        out = folder / "merged.h5"
        with h5py.File(out, "w") as h5:
            merge_batches(paths, h5, {"attention": 1, "gradient": 1}, compressed=["gradient"])
        with h5py.File(out, "r") as h5:
            np.testing.assert_array_equal(h5["gradient"][...], np.concatenate([b["gradient"] for b in batches]))
            np.testing.assert_array_equal(h5["attention"][...], np.concatenate([b["attention"] for b in batches]))
            assert h5["gradient"].compression == "gzip" and h5["gradient"].chunks == (1, 5, 4, 4)
        sizes[packed] = out.stat().st_size
    # the packed rows take about as much room as h5py's own compression of the same data (zlib builds differ)
    assert abs(sizes[True] - sizes[False]) <= 0.05 * sizes[False]


def test_merged_file_bytes_do_not_depend_on_the_number_of_writers(tmp_path):
    rng = np.random.default_rng(2)
    batches = [{"gradient": gradient_like(rng, n)} for n in (3, 3, 2, 3)]
    files = []
    for n_writers in (1, 2):
        folder = tmp_path / str(n_writers)
        folder.mkdir()
        paths = write_pieces(folder, batches, n_writers, packed=True)
        with h5py.File(folder / "m.h5", "w") as h5:
            merge_batches(paths, h5, {"gradient": 1}, compressed=["gradient"])
        files.append((folder / "m.h5").read_bytes())
    assert files[0] == files[1]


def test_compressed_arrays_must_be_chunked_by_row(tmp_path):
    paths = write_pieces(tmp_path, [{"gradient": gradient_like(np.random.default_rng(3), 4)}], 1, packed=False)
    with h5py.File(tmp_path / "m.h5", "w") as h5, pytest.raises(ValueError, match="one row per chunk"):
        merge_batches(paths, h5, {"gradient": 2}, compressed=["gradient"])


def test_a_failed_piece_write_leaves_no_piece(tmp_path):
    """An error while a piece is written (here: an array h5py cannot store) leaves neither the piece nor its
    temporary file."""
    with pytest.raises(TypeError):
        write_piece(tmp_path / piece_name(0), {"ok": np.zeros(3), "bad": np.array([object()])})
    assert not list(tmp_path.iterdir())


def test_atomic_output_removes_the_temporary_files_of_dead_processes(tmp_path):
    """A process killed with SIGKILL leaves its temporary name behind; the next write removes it (the pid is not
    a live process), but not one of a live process."""
    import os
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.txt.tmp-{int(dead.stdout)}"
    stale.write_text("half")
    live = tmp_path / f".out.txt.tmp-{os.getppid()}"
    live.write_text("busy")
    with atomic_output(tmp_path / "out.txt", durable=True) as tmp:
        tmp.write_text("done")
    assert (tmp_path / "out.txt").read_text() == "done" and not stale.exists() and live.exists()


def test_loader_ships_the_stored_parts_and_maps_on_assembles_them(tmp_path):
    """The train loader's workers return the stored parts (float16 gradient, float32 attention) and the batch
    is assembled where it is used: the same float32 maps as assembling each image on the host, by hand."""
    import torch

    from transfgu.pseudo import maps_on
    from transfgu.pseudo_store import PseudoMaskReader, write_pseudo_masks

    rng = np.random.default_rng(3)
    n, K, h = 6, 5, 4
    att = rng.random((n, h, h)).astype(np.float32)
    grad = gradient_like(rng, n, K, h)
    write_piece(tmp_path / piece_name(0), {"attention": att, "gradient": grad})
    write_pseudo_masks(tmp_path / "p.h5", [tmp_path / piece_name(0)], [str(i) for i in range(n)], R=32,
                       n_things=2, n_stuff=3, grad_scale=1.0)
    reader = PseudoMaskReader(tmp_path / "p.h5")
    item = reader[2]
    assert item["gradient"].dtype == torch.float16 and item["gradient"].shape == (K, h, h)
    assert item["attention"].dtype == torch.float32 and item["attention"].shape == (h, h)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(reader, range(n)), batch_size=4, num_workers=2)
    maps = torch.cat([maps_on(b, torch.device("cpu")) for b in loader])
    g32 = grad.astype(np.float32)
    expected = np.where(g32 >= 0, att[:, None] + g32, 0.0).astype(np.float32)  # P_k = a + q_k where q_k >= 0
    assert maps.dtype == torch.float32 and maps.shape == (n, K, h, h)
    np.testing.assert_array_equal(maps.numpy(), expected)
    plain = torch.from_numpy(expected)
    assert torch.equal(maps_on(plain, torch.device("cpu")), plain)  # assembled maps pass through


def test_on_point_sees_each_piece_written_then_in_place(tmp_path):
    """The hook the stages pass (transfgu.faults.hook): the n-th piece of a writer, once under its temporary
    name (partial=True, the piece not yet there) and once in place."""
    seen = []

    def on_point(n, partial=False):
        seen.append((n, partial, (tmp_path / piece_name(n + 6)).exists()))

    with PieceWriter(tmp_path, on_point=on_point) as w:
        for b in (7, 8):
            w.write(b, {"x": np.arange(3)})
    assert seen == [(1, True, False), (1, False, True), (2, True, False), (2, False, True)]
