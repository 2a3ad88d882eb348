"""Two-phase ingest (issue 14): --workers N, --plan-only / --part i/N / commit give the serial store, byte for byte.

Inputs: a synthetic .h5ad (`sclabel-data synth`, 8,000 cells with ~600 non-zeros each, so that --shuffle
spreads rows over 2 buckets of the out-of-core shuffle) and a small .h5ad without the `tissue` column
(an optional obs column). Stores are compared file by file, every byte (shards, checksums, index.json).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from h1_builders import make_adata, read_obs, write_h5ad

from data_tools.ingest import main as ingest
from data_tools.ingest_plan import PLAN_DIR
from data_tools.shuffle_write import num_buckets
from data_tools.validate import validate_store
from sclabel_dist.data import format as fmt

OPTS = ["--obs-columns", "cell_type,batch,tissue?", "--rows-per-shard", "500", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("parallel-inputs")
    synth = d / "synth.h5ad"
    subprocess.run(
        [sys.executable, "-m", "data_tools", "synth", "--quiet", "--cells", "8000", "--genes", "1500"]
        + ["--nnz-per-cell", "600", "--seed", "3", "--out", str(synth)],
        check=True,
        capture_output=True,
    )
    small = write_h5ad(d / "small.h5ad", make_adata(700, seed=2))
    return [str(synth), str(small)]


def tree(store: Path) -> dict[str, bytes]:
    """Every file of a store, by relative path, with its bytes."""
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    differ = [k for k in ta if ta[k] != tb[k]]
    assert not differ, f"files differ: {differ[:5]}"


def serial(inputs: list[str], out: Path, *extra: str) -> Path:
    assert ingest([*inputs, "-o", str(out), *OPTS, *extra]) == 0
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_tools", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def serial_store(inputs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serial(inputs, tmp_path_factory.mktemp("serial") / "store")


def test_two_workers_write_the_serial_store(inputs: list[str], serial_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "par"
    assert ingest([*inputs, "-o", str(out), *OPTS, "--workers", "2"]) == 0
    assert_same_store(serial_store, out)
    index = fmt.read_index(out)
    assert index.num_rows == 8700 and index.num_shards == 16 + 2
    assert read_obs(out, "small", "tissue") == [None] * 700  # the optional column absent from that input
    assert validate_store(out) == ([], [])
    assert not (out / PLAN_DIR).exists()


def test_parts_in_separate_processes_then_commit(
    inputs: list[str], serial_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "parts"
    assert cli("ingest", *inputs, "-o", str(out), *OPTS, "--plan-only").returncode == 0
    assert not (out / fmt.INDEX_FILE).exists()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "data_tools",
                "ingest",
                *inputs,
                "-o",
                str(out),
                *OPTS,
                "--part",
                f"{i}/2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in (1, 0)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert not (out / fmt.INDEX_FILE).exists()  # nothing is a store before the commit
    again = cli("ingest", *inputs, "-o", str(out), *OPTS, "--part", "0/2")
    assert again.returncode == 0 and "already written" in again.stdout
    done = cli("commit", str(out))
    assert done.returncode == 0, done.stderr
    assert_same_store(serial_store, out)
    late = cli("commit", str(out))  # a later array task: nothing left to do, not an error
    assert late.returncode == 0 and "nothing to commit" in late.stdout
    assert_same_store(serial_store, out)


def test_shuffle_is_the_serial_permutation_for_any_number_of_workers(
    inputs: list[str], tmp_path: Path
) -> None:
    ref = serial(inputs, tmp_path / "serial", "--shuffle", "--seed", "7")
    index = fmt.read_index(ref)
    synth_nnz = index.datasets[0].nnz
    assert num_buckets(synth_nnz, 8000) >= 2, "the input must spread over several shuffle buckets"
    for n in ("2", "3"):
        out = tmp_path / f"w{n}"
        assert ingest([*inputs, "-o", str(out), *OPTS, "--shuffle", "--seed", "7", "--workers", n]) == 0
        assert_same_store(ref, out)
    # and it is a shuffle: the synthetic cells' types are not in file order
    plain = read_obs(serial(inputs, tmp_path / "plain"), "synth", "cell_type")
    shuffled = read_obs(ref, "synth", "cell_type")
    assert sorted(plain) == sorted(shuffled) and plain != shuffled


def test_append_in_parallel_equals_serial_append(inputs: list[str], tmp_path: Path) -> None:
    a, b = (serial([inputs[0]], tmp_path / n, "--dataset-name", "first") for n in "ab")
    extra = ["--append", "--shuffle", "--seed", "1", "--dataset-name", "again"]
    serial([inputs[0]], a, *extra)
    assert ingest([inputs[0], "-o", str(b), *OPTS, *extra, "--workers", "2"]) == 0
    assert_same_store(a, b)
    assert [d.name for d in fmt.read_index(b).datasets] == ["first", "again"]


def _kill_when_a_shard_appears(proc: subprocess.Popen, out: Path, victim) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any((out / fmt.SHARDS_DIR).glob("*/part_*")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be killed; make the input bigger"
    os.kill(victim(proc), signal.SIGKILL)


def test_killed_part_is_redone_on_rerun(inputs: list[str], serial_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    assert cli("ingest", *inputs, "-o", str(out), *OPTS, "--plan-only").returncode == 0
    cmd = [sys.executable, "-m", "data_tools", "ingest", *inputs, "-o", str(out), *OPTS, "--part", "0/2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when_a_shard_appears(proc, out, lambda p: p.pid)
    assert proc.wait() == -signal.SIGKILL
    assert cli("ingest", *inputs, "-o", str(out), *OPTS, "--part", "1/2").returncode == 0
    refused = cli("commit", str(out))
    assert refused.returncode == 2 and "part 0/2 is missing" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (out / fmt.INDEX_FILE).exists()
    rerun = cli("ingest", *inputs, "-o", str(out), *OPTS, "--part", "0/2")
    assert rerun.returncode == 0 and "already written" not in rerun.stdout
    assert cli("commit", str(out)).returncode == 0
    assert_same_store(serial_store, out)


def test_killed_worker_then_the_same_command_completes(
    inputs: list[str], serial_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "wkill"
    args = [*inputs, "-o", str(out), *OPTS, "--workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_tools", "ingest", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def a_worker(p: subprocess.Popen) -> int:
        kids = [c for c in psutil.Process(p.pid).children() if "spawn" in " ".join(c.cmdline())]
        assert kids, "no spawned worker found"
        return kids[0].pid

    _kill_when_a_shard_appears(proc, out, a_worker)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "was killed by signal 9" in err, err
    assert not (out / fmt.INDEX_FILE).exists()
    assert ingest(args) == 0
    assert_same_store(serial_store, out)


def test_commit_refuses_a_corrupt_part_and_names_it(
    inputs: list[str], serial_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "corrupt"
    assert cli("ingest", *inputs, "-o", str(out), *OPTS, "--plan-only").returncode == 0
    for i in range(2):
        assert cli("ingest", *inputs, "-o", str(out), *OPTS, "--part", f"{i}/2").returncode == 0
    victim = sorted((out / fmt.SHARDS_DIR / "small").glob("part_*/data/c/*"))[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    refused = cli("commit", str(out))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "part 1/2" in refused.stderr and "shards/small/part_00000 is corrupt" in refused.stderr
    assert not (out / fmt.INDEX_FILE).exists()
    rerun = cli("ingest", *inputs, "-o", str(out), *OPTS, "--part", "1/2")  # rewrites the refused part
    assert rerun.returncode == 0 and "already written" not in rerun.stdout
    assert cli("commit", str(out)).returncode == 0
    assert_same_store(serial_store, out)


def test_a_part_with_other_options_than_the_plan_is_refused(inputs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "mismatch"
    assert cli("ingest", *inputs, "-o", str(out), *OPTS, "--plan-only").returncode == 0
    bad = cli("ingest", *inputs, "-o", str(out), *OPTS, "--shuffle", "--part", "0/2")
    assert bad.returncode == 2 and "other inputs or options" in bad.stderr
    assert not any((out / fmt.SHARDS_DIR).glob("*/part_*"))
    none = cli("commit", str(out))
    assert none.returncode == 2 and "no part" in none.stderr


def test_part_numbers_are_checked(inputs: list[str], tmp_path: Path) -> None:
    bad = cli("ingest", *inputs, "-o", str(tmp_path / "x"), *OPTS, "--part", "2/2")
    assert bad.returncode == 2 and "0 <= i < N" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_lognorm_input_scanned_in_parallel_gives_the_serial_report(tmp_path: Path) -> None:
    """Float sums depend on their order: the parallel plan must still write the serial match report."""
    adata = make_adata(3000, seed=5)
    adata.X = adata.X.astype(np.float32)
    adata.X.data = np.log1p(adata.X.data * 1.37).astype(np.float32)
    src = str(write_h5ad(tmp_path / "lognorm.h5ad", adata))
    extra = ["--block-rows", "256", "--rows-per-shard", "700", "--no-progress", "--obs-columns", "cell_type"]
    assert ingest([src, "-o", str(tmp_path / "serial"), *extra]) == 0
    assert ingest([src, "-o", str(tmp_path / "par"), *extra, "--workers", "2"]) == 0
    assert_same_store(tmp_path / "serial", tmp_path / "par")
    assert fmt.read_index(tmp_path / "par").datasets[0].value_kind == "lognorm"


def test_10x_and_soma_inputs_in_parallel_equal_serial(tmp_path: Path) -> None:
    """Every reader works in the parts: a 10x directory (re-spilled by each part) and a SOMA experiment."""
    from h1_builders import ENSEMBL, GENES, counts_matrix, write_10x

    tenx = write_10x(tmp_path / "tenx", counts_matrix(900, 40, 4), GENES, ENSEMBL, gz=True)
    small = write_h5ad(tmp_path / "a.h5ad", make_adata(300, seed=1))
    assert cli("to-soma", str(small), "--out", str(tmp_path / "soma")).returncode == 0
    inputs = [str(tenx), str(tmp_path / "soma")]
    extra = ["--rows-per-shard", "100", "--no-progress", "--shuffle", "--obs-columns", "cell_type?"]
    assert ingest([*inputs, "-o", str(tmp_path / "serial"), *extra]) == 0
    assert ingest([*inputs, "-o", str(tmp_path / "par"), *extra, "--workers", "2"]) == 0
    assert_same_store(tmp_path / "serial", tmp_path / "par")
    assert fmt.read_index(tmp_path / "par").num_rows == 1200


def test_a_shard_has_the_same_bytes_whichever_pipeline_a_reader_switched_on(tmp_path: Path) -> None:
    """zarrs compresses to other bytes than zarr's own pipeline; a reader switches the process to zarrs, and a
    serial ingest that read a store before writing must still write what a fresh worker process writes."""
    import numpy as np
    import scipy.sparse as sp
    import zarr

    from data_tools.writer import write_part

    m = sp.random(2000, 1500, density=0.3, format="csr", random_state=0, dtype=np.float32)
    m.data = np.ceil(m.data * 10)

    def written(name: str) -> dict[str, bytes]:
        write_part(tmp_path / name, m.indptr, m.indices, m.data, {}, "counts", 1500, m.nnz / 2000, "x")
        return tree(tmp_path / name)

    before = written("own")
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        # zarrs encodes a shard's chunks in parallel and lays them out as they finish: the bytes vary from
        # one write to the next, so one write may match by chance; twenty rarely all do
        after = [written(f"zarrs{i}") for i in range(20)]
    assert all(a == before for a in after)


def test_worker_memory_sets_the_block_and_never_the_store(
    inputs: list[str], serial_store: Path, tmp_path: Path
) -> None:
    """A budget that binds reads smaller blocks (the store is still the serial one, byte for byte); a budget
    that cannot hold one shard is refused before anything is committed, naming the part, dataset and need."""
    import re

    free = cli(
        "ingest", *inputs, "-o", str(tmp_path / "free"), *OPTS, "--workers", "2", "--worker-memory", "8GiB"
    )
    assert free.returncode == 0, free.stderr
    said = re.findall(r"dataset synth: (\d+) MiB resident, blocks of (\d+) rows", free.stdout)
    assert len(said) == 2 and all(int(rows) == 4096 for _, rows in said), (
        free.stdout
    )  # not binding: --block-rows
    # resident + one shard (500 rows x ~600 nnz: ~6 MiB) + 40 MiB: ~3,000 rows of ~14 KiB
    budget = max(int(r) for r, _ in said) + 46
    out = tmp_path / "tight"
    tight = cli("ingest", *inputs, "-o", str(out), *OPTS, "--workers", "2", "--worker-memory", f"{budget}MiB")
    assert tight.returncode == 0, tight.stderr
    rows = [
        int(n) for n in re.findall(r"dataset synth: \d+ MiB resident, blocks of (\d+) rows", tight.stdout)
    ]
    assert len(rows) == 2 and all(64 <= n < 4096 for n in rows), tight.stdout
    assert_same_store(serial_store, out)

    refused = tmp_path / "refused"
    proc = cli("ingest", *inputs, "-o", str(refused), *OPTS, "--workers", "2", "--worker-memory", "20MiB")
    assert proc.returncode == 2
    assert "--worker-memory 20 MiB cannot hold this worker" in proc.stderr and "dataset synth" in proc.stderr
    assert "give at least" in proc.stderr and "part 0/2" in proc.stderr, proc.stderr
    assert not (refused / fmt.INDEX_FILE).exists()


def test_worker_memory_is_a_size_and_needs_workers(inputs: list[str], tmp_path: Path) -> None:
    from data_tools.worker_memory import block_rows_within, parse_size_mib

    assert [parse_size_mib(t) for t in ("800MiB", "800M", "2GiB", "1.5g", "700", "512KiB")] == [
        800,
        800,
        2048,
        1536,
        700,
        0,
    ]
    # the block grows with the budget up to --block-rows; the shard part is never shrunk
    rows = [block_rows_within(b, 200, 500, 600, False, 4096, "x") for b in (220, 240, 400)]
    assert rows[0] < rows[1] < rows[2] == 4096
    assert block_rows_within(240, 200, 500, 600, True, 4096, "x") < rows[1]  # shuffled parts hold more
    proc = cli("ingest", inputs[1], "-o", str(tmp_path / "s"), "--worker-memory", "1GiB")
    assert proc.returncode == 2 and "--worker-memory budgets the workers of --workers N" in proc.stderr
    proc = cli("ingest", inputs[1], "-o", str(tmp_path / "s"), "--workers", "2", "--worker-memory", "lots")
    assert proc.returncode == 2 and "--worker-memory 'lots'" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_the_slurm_array_script_writes_the_serial_store(
    inputs: list[str], serial_store: Path, tmp_path: Path
) -> None:
    """launch/slurm_ingest.sbatch as two array tasks (run here one after the other, with SLURM's variables)."""
    script = Path(__file__).resolve().parents[2] / "launch" / "slurm_ingest.sbatch"
    out = tmp_path / "slurm"
    said = []
    for task in ("0", "1"):
        env = dict(
            os.environ,
            OUT=str(out),
            INPUTS=" ".join(inputs),
            ARGS=" ".join(OPTS[:-1]),  # --no-progress: the script adds it
            PYTHON=sys.executable,
            SLURM_ARRAY_TASK_ID=task,
            SLURM_ARRAY_TASK_COUNT="2",
            SLURM_MEM_PER_NODE="4096",
        )
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        said.append(proc.stdout)
    assert "commit left to the task that finishes last" in said[0] and "is committed" in said[1]
    assert "within --worker-memory 3686 MiB" in said[0]  # 90% of the task's --mem
    assert_same_store(serial_store, out)
