"""build-records against hostile input and hostile events (issue 11): killed workers, SIGTERM, two builds at once,
huge sizes, paths and links out of --images, option changes, short CSV rows, tiny images, bad ages, split lists
that do not match the CSV, unsalted DICOM ids. Every process is waited for with a timeout: nothing can hang."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxrkeras.cli import cli
from cxrkeras.data import features
from cxrkeras.data import records as rec
from cxrkeras.data import shards
from cxrkeras.data.inspect import inspect_records
from cxrkeras.errors import ConfigError, DataError
from records_helpers import images_by_patient, make_dicom, ramp12, read_records, small_nih

QUIET = dict(workers=1, progress=False)
TESTS = os.path.dirname(os.path.abspath(__file__))
# build-records' CLI in a fresh process, every image 50 ms slower (records_helpers.slow_encode_task) and the
# process pool used whatever the number of images, so that a build lasts long enough to be killed
SLOW_BUILD = f"""
import sys
if __name__ == "__main__":
    sys.path.insert(0, {TESTS!r})
    import records_helpers
    from cxrkeras.data import shards
    shards._encode_task = records_helpers.slow_encode_task
    shards.MIN_TASKS_PER_WORKER = 1
    from cxrkeras.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _build_args(sample64, out):
    csv_path, images = sample64
    return ["build-records", "--csv", csv_path, "--images", images, "--out", out, "--image-size", "32",
            "--shard-size", "20", "--no-progress"]


def _interrupt_slow_build(tmp_path, sample64, shards, hit):
    """Start a slow 2-worker build into tmp_path/out, wait for `shards` finished shards, call hit(build process,
    worker pids), wait (bounded) for the build to end: (out, exit status, seconds from the hit, output, workers)."""
    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_BUILD)
    out = str(tmp_path / "out")
    log = open(tmp_path / "build.log", "w+")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, str(script)] + _build_args(sample64, out) + ["--workers", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(lambda: len(_receipts(out)) >= shards, 120, f"{shards} finished shard(s)")
        workers = _wait_for(lambda: _children(proc.pid), 10, "the encoding workers")
        hit_at = time.monotonic()
        hit(proc, workers)
        rc = proc.wait(timeout=60)
        seconds = time.monotonic() - hit_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    log.seek(0)
    return out, rc, seconds, log.read(), workers


def _children(pid):
    """PIDs of the encoding workers of process `pid` (its children running multiprocessing's spawn_main)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _receipts(out):
    folder = os.path.join(out, shards.RECEIPTS)
    return [f for f in os.listdir(folder) if f.endswith(".tfrecord.json")] if os.path.isdir(folder) else []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _check_resumed(out, sample64):
    """A re-run finishes the folder: every CSV image exactly once, and the folder matches its manifest."""
    report = rec.build_records(sample64[0], sample64[1], out, image_size=32, shard_size=20, **QUIET)
    ids = [r[features.IMAGE_ID].decode() for r in read_records(out)]
    with open(sample64[0]) as f:
        expected = sorted(line.split(",")[0] for line in f.read().splitlines()[1:])
    assert sorted(ids) == expected and len(ids) == len(set(ids)) == 268
    assert inspect_records(out).problems == []
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    return report


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
@pytest.mark.timeout(240)
def test_killed_worker_fails_within_seconds_and_the_rerun_resumes(tmp_path, sample64):
    """Row 1: a worker killed like the OOM killer does (SIGKILL, by PID) used to hang the build forever."""
    out, rc, seconds, text, workers = _interrupt_slow_build(
        tmp_path, sample64, 2, lambda proc, workers: os.kill(workers[0], signal.SIGKILL))
    assert rc == 1 and seconds < 15, (rc, seconds, text)
    assert f"pid {workers[0]} killed by SIGKILL" in text and "out-of-memory" in text, text
    assert "re-run the same command to resume" in text and "Traceback" not in text, text
    _wait_for(lambda: not any(_alive(p) for p in workers), 15, "the other workers to exit")
    report = _check_resumed(out, sample64)
    assert report.shards_kept >= 2 and report.shards_written >= 1
    print(f"worker kill -> exit {rc} after {seconds:.2f} s")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
@pytest.mark.timeout(240)
def test_sigterm_ends_with_one_line_and_no_worker_traceback(tmp_path, sample64):
    """Row 15: SIGTERM during a parallel build used to leave the workers printing BrokenPipeError tracebacks."""
    out, rc, _, text, workers = _interrupt_slow_build(
        tmp_path, sample64, 1, lambda proc, workers: proc.send_signal(signal.SIGTERM))
    time.sleep(1.5)  # give an orphaned worker time to print, were there one
    with open(tmp_path / "build.log") as f:
        text = f.read()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("WARNING: All log", "I0000", "W0000"))]
    assert rc == 128 + signal.SIGTERM, text
    assert len(lines) == 1 and lines[0].startswith("Error: build-records stopped by SIGTERM; "), text
    assert "re-run the same command to resume" in lines[0]
    assert "Traceback" not in text and "BrokenPipeError" not in text
    assert not any(_alive(p) for p in workers)
    _check_resumed(out, sample64)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
@pytest.mark.timeout(240)
def test_workers_do_not_outlive_a_killed_build(tmp_path, sample64):
    """kill -9 of the build itself gives it no chance to stop its workers: they notice and leave by themselves."""
    out, rc, _, _, workers = _interrupt_slow_build(
        tmp_path, sample64, 1, lambda proc, workers: proc.send_signal(signal.SIGKILL))
    assert rc == -signal.SIGKILL
    _wait_for(lambda: not any(_alive(p) for p in workers), 15, "the orphaned workers to exit")
    _check_resumed(out, sample64)


@pytest.mark.timeout(120)
def test_a_second_build_into_the_same_folder_is_refused(tmp_path, sample64):
    """Row 14: two builds into one folder used to both do all the work; the lock dies with its process."""
    csv_path, images, _ = small_nih(tmp_path, sample64, n=12)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cxrkeras.data.shards import folder_lock\n"
         f"with folder_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(DataError, match=rf"being written by another build-records \(pid {holder.pid} on .*"
                                            r"wait for it to finish.*another --out"):
            rec.build_records(csv_path, images, str(out), image_size=32, **QUIET)
        assert time.monotonic() - started < 30
        assert not [f for f in os.listdir(out) if f.endswith(".tfrecord")]  # the refused build wrote nothing
        holder.kill()  # kill -9: no chance to unlock; the kernel drops the lock with the process
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
    report = rec.build_records(csv_path, images, str(out), image_size=32, **QUIET)
    assert report.shards_written >= 1 and inspect_records(str(out)).problems == []


def test_sizes_are_bounded_and_memory_is_checked_at_once(tmp_path, sample64, monkeypatch):
    """Row 2: --image-size 100000 used to run for minutes, then be killed by the kernel at 21.7 GB."""
    csv_path, images = sample64
    started = time.monotonic()
    res = CliRunner().invoke(cli, ["build-records", "--csv", csv_path, "--images", images, "--out",
                                   str(tmp_path / "o"), "--image-size", "100000"])
    assert res.exit_code == 2 and "100000 is not in the range 8<=x<=4096" in res.output
    for option, value in (("--shard-size", "1000000"), ("--workers", "1000"), ("--workers", "0")):
        res = CliRunner().invoke(cli, ["build-records", "--csv", csv_path, option, value])
        assert res.exit_code == 2 and "is not in the range" in res.output, (option, res.output)
    for kwargs, pattern in ((dict(image_size=100_000), "--image-size 100000: must be 8 to 4096"),
                            (dict(shard_size=0), "--shard-size 0: must be 1 to 100000"),
                            (dict(workers=999), "--workers 999: must be 1 to 256")):
        with pytest.raises(ConfigError, match=pattern):
            rec.build_records(csv_path, images, str(tmp_path / "o"), **{**QUIET, **kwargs})
    assert time.monotonic() - started < 20 and not os.path.exists(tmp_path / "o")

    per_worker = rec.worker_memory(4096, 3)
    assert per_worker > 4 * 4096 * 4096 * 3  # the measured ~3.5 bytes per output value, with margin
    monkeypatch.setattr(rec, "available_memory", lambda: int(2.5 * per_worker))
    with pytest.raises(ConfigError, match=r"--image-size 4096 with 8 worker\(s\) needs about .* use --workers 2"):
        rec.build_records(csv_path, images, str(tmp_path / "o"), image_size=4096, channels=3, workers=8,
                          progress=False)
    monkeypatch.setattr(rec.os, "cpu_count", lambda: 8)
    assert rec._check_options(4096, 3, 1000, None) == 2  # the default (all 8 cores) is lowered to what fits
    monkeypatch.setattr(rec, "available_memory", lambda: per_worker // 2)
    with pytest.raises(ConfigError, match="a smaller --image-size"):
        rec._check_options(4096, 3, 1000, None)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.timeout(120)
def test_paths_and_links_out_of_the_image_root_are_never_read(tmp_path, sample64):
    """Row 4: an absolute CSV path (/etc/passwd), `..`, and file or folder links leading out of --images were
    opened; the first bytes of /etc/passwd landed in manifest.json."""
    _, images64 = sample64
    names = sorted(os.listdir(images64))[:8]
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "imgs").mkdir(parents=True)
    (elsewhere / "sub").mkdir(parents=True)
    for name in names[:4]:
        (root / "imgs" / name).write_bytes(open(os.path.join(images64, name), "rb").read())
    secret = elsewhere / "secret.png"
    secret.write_bytes(open(os.path.join(images64, names[4]), "rb").read())
    (elsewhere / "sub" / "x.png").write_bytes(open(os.path.join(images64, names[5]), "rb").read())
    (elsewhere / "passwd").write_text("root:x:0:0:SECRETSTUFF:/root:/bin/bash\n")
    os.symlink(secret, root / "imgs" / "link.png")  # a file link out
    os.symlink(elsewhere / "sub", root / "linkdir")  # a folder link out (not searched)
    os.symlink(root, root / "imgs" / "loop")  # a link back up: walked once, never forever
    inside_abs = str(root / "imgs" / names[3])
    rows = [f"imgs/{names[0]},Effusion,p0", f"imgs/{names[1]},,p1", f"imgs/{names[2]},Effusion,p2",
            f"{inside_abs},,p3", f"{elsewhere / 'passwd'},,p4", f"{secret},Effusion,p5",
            "../elsewhere/secret.png,,p6", "imgs/link.png,Effusion,p7", "linkdir/x.png,,p8",
            "imgs/../../elsewhere/secret.png,,p9"]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,labels,patient_id\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    m = rec.build_records(str(csv_path), str(root), out, labels="Effusion", image_size=32, **QUIET).manifest
    reasons = {s["image"]: s["reason"] for s in m["skipped"]}
    outside = [r.split(",")[0] for r in rows[4:]]
    assert reasons == {p: "outside the image root" for p in outside}
    assert sum(s["images"] for s in m["splits"].values()) == 4
    stored = {r[features.IMAGE_ID].decode() for r in read_records(out)}
    assert stored == {f"imgs/{n}" for n in names[:3]} | {inside_abs}
    everything = b"".join(open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(out) for f in fs)
    assert b"SECRETSTUFF" not in everything and b"root:x" not in everything
    warnings = " | ".join(m["warnings"])
    assert "6 CSV path(s) lead outside --images" in warnings and "1 folder link(s) under --images" in warnings
    with pytest.raises(DataError, match=r"outside the image root"):
        rec.build_records(str(csv_path), str(root), str(tmp_path / "strict"), labels="Effusion", strict=True, **QUIET)

    from cxrkeras.data import images as imglib

    with pytest.raises(imglib.ImageError) as info:  # a non-image's bytes are never quoted in the reason
        imglib.read_image(str(elsewhere / "passwd"))
    assert info.value.reason == "not an image file (unrecognised format, 39 bytes)"


def test_rerun_with_other_options_is_refused_unless_overwrite(tmp_path, sample64, monkeypatch):
    """Row 5: re-running into the folder with another --image-size used to replace the shards silently, also
    when an interrupted build had left no manifest yet."""
    csv_path, images, _ = small_nih(tmp_path, sample64, n=20)
    out = str(tmp_path / "out")
    real, calls = shards._encode_task, []

    def interrupted(task):
        calls.append(task)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(shards, "_encode_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rec.build_records(csv_path, images, out, image_size=32, shard_size=5, **QUIET)
    monkeypatch.setattr(shards, "_encode_task", real)
    assert not os.path.exists(os.path.join(out, "manifest.json")) and len(_receipts(out)) == 1
    with pytest.raises(DataError, match=r"other options \(image_size 32 -> 48\).*--overwrite"):
        rec.build_records(csv_path, images, out, image_size=48, shard_size=5, **QUIET)
    args = ["build-records", "--csv", csv_path, "--images", images, "--out", out, "--shard-size", "5",
            "--workers", "1", "--no-progress"]
    res = CliRunner().invoke(cli, args + ["--image-size", "32", "--split-fractions", "0.6,0.2,0.2"])
    assert res.exit_code == 1 and "split_fractions [0.7, 0.1, 0.2] -> [0.6, 0.2, 0.2]" in res.output
    res = CliRunner().invoke(cli, args + ["--image-size", "32"])  # the same options: resumes
    assert res.exit_code == 0 and "already complete and kept" in res.output
    res = CliRunner().invoke(cli, args + ["--image-size", "48"])
    assert res.exit_code == 1 and "image_size 32 -> 48" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, args + ["--image-size", "48", "--overwrite"])
    assert res.exit_code == 0, res.output
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["image_size"] == [48, 48] and inspect_records(out).problems == []
    assert {r[features.IMAGE_HEIGHT] for r in read_records(out)} == {48}


def test_small_images_and_unreadable_ages_are_counted_listed_and_warned(tmp_path, sample64):
    """Row 11: a 10x10 image was silently upsampled and an age "abc" silently stored as -1."""
    csv_path, images, rows = small_nih(tmp_path, sample64, n=12)
    names = [r.split(",")[0] for r in rows]
    Image.fromarray(np.full((10, 10), 128, np.uint8)).save(os.path.join(images, "images_001", "images", names[1]))
    lines = open(csv_path).read().splitlines()
    fields = lines[3].split(",")
    fields[4] = "abc"  # Patient Age of CSV line 4
    lines[3] = ",".join(fields)
    open(csv_path, "w").write("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    res = CliRunner().invoke(cli, ["build-records", "--csv", csv_path, "--images", images, "--out", out,
                                   "--image-size", "32", "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["upsampled"] == {"count": 1, "images": [{"image": names[1], "row": 3, "size": [10, 10]}]}
    assert m["unreadable_values"] == {"Patient Age": {"count": 1, "rows": [4]}}
    assert f"warning: 1 image(s) smaller than --image-size 32 were upsampled, the smallest {names[1]} (10x10" \
        in res.output
    assert "warning: column 'Patient Age' cannot be read on 1 CSV line(s) (4): stored as -1" in res.output
    ages = {r[features.IMAGE_ID].decode(): int(r[features.AGE]) for r in read_records(out)}
    assert ages[names[2]] == -1 and ages[names[0]] == int(rows[0].split(",")[4])


def test_split_lists_that_miss_csv_rows_or_name_absent_images_are_warned(tmp_path, sample64):
    """Row 12: rows left out by the split lists, and listed images without a CSV row, were only in the manifest."""
    csv_path, images, rows = small_nih(tmp_path, sample64, n=30)
    by_patient = images_by_patient(rows)
    patients = sorted(by_patient)
    left_out = by_patient[patients[0]]
    (tmp_path / "train_val.txt").write_text("\n".join(i for p in patients[1:-3] for i in by_patient[p]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(i for p in patients[-3:] for i in by_patient[p]) +
                                       "\n77777777_000.png\n88888888_000.png\n")
    res = CliRunner().invoke(cli, ["build-records", "--csv", csv_path, "--images", images, "--out",
                                   str(tmp_path / "out"), "--split-lists", str(tmp_path / "train_val.txt"),
                                   str(tmp_path / "test.txt"), "--image-size", "32", "--workers", "1",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"warning: {len(left_out)} CSV row(s) are in none of the split lists and were left out (e.g. " \
           f"{left_out[0]}" in res.output
    assert "warning: the split lists name 2 image(s) that have no CSV row (e.g. 77777777_000.png, " \
           "88888888_000.png)" in res.output


def test_dicom_patient_ids_without_salt_are_warned(tmp_path):
    """Row 13: DICOM patient ids hashed without --id-salt (guessable MRNs can be reversed) gave no warning."""
    root = tmp_path / "dcm"
    root.mkdir()
    lines = ["path,labels"]
    for p in range(4):
        make_dicom(root / f"P{p}.dcm", ramp12(16), patient_id=f"MRN{p:04d}")
        lines.append(f"P{p}.dcm,{'Effusion' if p % 2 else ''}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    args = ["build-records", "--csv", str(root / "labels.csv"), "--images", str(root), "--format", "dicom",
            "--labels", "Effusion", "--image-size", "16", "--workers", "1", "--no-progress"]
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "warning: patient ids are hashes of the DICOM PatientIDs without --id-salt" in res.output
    assert "re-identify patients" in res.output
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "b"), "--id-salt", "s3cret"])
    assert res.exit_code == 0 and "--id-salt" not in res.output
