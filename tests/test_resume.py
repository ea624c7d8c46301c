"""Resumption and integrity: items that kill their worker, unexpected failures, changed versions and assets, and
kills and re-runs with any --workers and --num-shards, ending with every sample exactly once.

Worker deaths are real: a watcher reads the journal's ``start`` record (written before the item runs, with the
pid of the process about to render it) and SIGKILLs that process, as an out-of-memory kill would."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import trimesh

from tests.waiting import Killer, wait_while_running
from wt_datagen.cli import main
from wt_datagen.pipeline.executors import select_part
from wt_datagen.pipeline.plan import plan_items
from wt_datagen.pipeline.shards import ResumeError, ShardSet

ROOT = Path(__file__).resolve().parents[1]
VICTIM = "victim.ply"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Eight small boxes and one bigger sphere (the item the tests kill). Numbered, the boxes would be one
    deforming box (one face array): they are lettered."""
    root = tmp_path_factory.mktemp("assets")
    for i in range(8):
        trimesh.creation.box(extents=(1, 1 + i / 8, 1)).export(root / f"box{'abcdefgh'[i]}.ply")
    trimesh.creation.icosphere(subdivisions=6).export(root / VICTIM)
    return root


def config(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"views": 2, "resolution": 24, "layers": 2, "shards": {"max_samples": 2},
                                "image": {"renderer": "raytrace"}, **extra}))
    return path


def command(assets: Path, out: Path, cfg: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "wt_datagen.cli", "render", str(assets), "--config", str(cfg), "--out", str(out),
            *flags]


def keys(out: Path) -> list[str]:
    """Every sample key in the folder's shards, read with plain tarfile, sorted (repeats kept)."""
    found = []
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            found += list({m.name.split(".", 1)[0] for m in tf.getmembers()})
    return sorted(found)


def expected(assets: Path, views: int = 2, without: tuple[str, ...] = ()) -> list[str]:
    return sorted(f"{it.item_id}_v{v:04d}" for it in plan_items(assets) if it.rel_path not in without
                  for v in range(views))


def check_folder(out: Path) -> dict:
    """Every shard file is a journaled shard of the manifest; nothing temporary is left."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(s["name"] for s in manifest["shards"])
    return manifest


def run(cmd: list[str], killer: Killer | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "osmesa")}
    if killer:
        killer.start()
    try:
        return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        if killer:
            killer.stop = True
            killer.join()


@pytest.mark.parametrize("workers", ["2", "1"])
def test_an_item_that_kills_its_worker_is_failed_and_the_run_goes_on(assets, tmp_path, workers):
    out, cfg = tmp_path / "out", config(tmp_path)
    cmd = command(assets, out, cfg, "--workers", workers)
    killer = Killer(out, VICTIM, 3)
    first = run(cmd, killer)
    if workers == "1":
        # the item renders in the run's own process: its death ends the run; the next run isolates it
        assert first.returncode == -signal.SIGKILL and len(killer.killed) == 1
        killer = Killer(out, VICTIM, 3)
        first = run(cmd, killer)
        assert killer.killed[0] != os.getpid()
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(killer.killed) == 2  # killed twice (max_crashes 2), then not started again
    manifest = check_folder(out)
    status = manifest["assets"][VICTIM]
    assert status["status"] == "failed"
    assert status["reason"] == "killed its worker process 2 times (last: killed by signal SIGKILL); not retried"
    assert manifest["totals"]["rendered"] == 8 and manifest["complete"]
    assert keys(out) == expected(assets, without=(VICTIM,))
    # the next run does not start it again, and says why
    again = run(cmd)
    assert again.returncode == 0 and "1 failed for good" in again.stdout, again.stdout
    journal = (out / "journal.jsonl").read_text()
    assert journal.count(f'"start": "{VICTIM}"') == (3 if workers == "1" else 2)
    assert keys(out) == expected(assets, without=(VICTIM,))


def test_an_unexpected_error_fails_with_its_traceback_and_is_retried(assets, tmp_path):
    out, cfg = tmp_path / "out", config(tmp_path, image={"renderer": "pyrender", "fallback": "none"})
    cmd = command(assets, out, cfg, "--limit", "2")
    env = {**os.environ, "PYOPENGL_PLATFORM": "no-such-platform"}  # OpenGL cannot load: not a bad input
    first = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in manifest["assets"].values()] == ["failed", "failed"]
    assert all("OpenGL unavailable" in s["reason"] for s in manifest["assets"].values())
    log = (out / "failures.log").read_text()
    assert log.count("Traceback (most recent call last)") == 2 and "boxa.ply" in log
    second = run(cmd)  # OpenGL works now: both are rendered, no sample twice
    assert second.returncode == 0 and "2 assets rendered, 0 skipped, 0 failed" in second.stdout, second.stdout
    assert keys(out) == sorted(f"box{c}_ply_v{v:04d}" for c in "ab" for v in range(2))


def test_changed_versions_and_assets_need_a_choice(assets, tmp_path, capsys):
    src = tmp_path / "assets"
    shutil.copytree(assets, src, ignore=shutil.ignore_patterns(VICTIM))
    (src / "broken.ply").write_text("ply\nformat nonsense\n")
    out, cfg = tmp_path / "out", config(tmp_path)
    render = lambda *flags: main(["render", str(src), "--config", str(cfg), "--out", str(out), *flags])  # noqa: E731
    assert render() == 0
    before = keys(out)
    capsys.readouterr()
    # the package version changed: a one-line error and a choice
    journal = out / "journal.jsonl"
    lines = journal.read_text().splitlines()
    header = json.loads(lines[0])
    journal.write_text("\n".join([json.dumps({**header, "version": "0.0.1"}), *lines[1:]]) + "\n")
    assert render() == 2
    err = capsys.readouterr().err.strip()
    assert "rendered by version 0.0.1" in err and "--keep-going" in err and "\n" not in err
    assert render("--keep-going") == 0 and render() == 0
    # a rendered asset's content changed; another only touched; the broken one fixed
    with open(src / "boxd.ply", "ab") as f:
        f.write(b"\n")
    os.utime(src / "boxe.ply")
    trimesh.creation.box().export(src / "broken.ply")
    capsys.readouterr()
    assert render() == 2
    err = capsys.readouterr().err.strip()
    assert "1 asset(s) changed since they were rendered (boxd.ply)" in err and "\n" not in err
    assert render("--keep-going") == 0  # keeps boxd's samples, renders the fixed one
    assert keys(out) == sorted(before + ["broken_ply_v0000", "broken_ply_v0001"])
    capsys.readouterr()
    assert render() == 0 and "this run: 0 samples" in capsys.readouterr().out


def test_writers_of_other_splits_cannot_share_a_folder(tmp_path):
    a = ShardSet(tmp_path, 4, 10**9, {"h": 1}, part="-p00000of00002")
    a.open()
    ShardSet(tmp_path, 4, 10**9, {"h": 1}, part="-p00001of00002").open()  # the same split: fine
    for part in ("", "-p00000of00003"):
        with pytest.raises(ResumeError, match="parts of one --num-shards"):
            ShardSet(tmp_path, 4, 10**9, {"h": 1}, part=part).open()
    with pytest.raises(ResumeError, match="another render .* is writing part 0 of 2"):
        ShardSet(tmp_path, 4, 10**9, {"h": 1}, part="-p00000of00002").open()
    a.close([])
    ShardSet(tmp_path, 4, 10**9, {"h": 1}, part="-p00000of00003").open()


def test_a_dead_runs_unjournaled_shard_goes_whatever_the_next_split(assets, tmp_path):
    src = tmp_path / "assets"
    shutil.copytree(assets, src, ignore=shutil.ignore_patterns(VICTIM))
    out, cfg = tmp_path / "out", config(tmp_path, shards={"max_samples": 4})
    assert main(["render", str(src), "--config", str(cfg), "--out", str(out), "--limit", "4"]) == 0
    # a whole-dataset run died after renaming a shard of boxe and boxf, before journaling it
    other = tmp_path / "other"
    assert main(["render", str(src), "--config", str(cfg), "--out", str(other)]) == 0
    (holder,) = [s for s in json.loads((other / "manifest.json").read_text())["shards"]
                 if s["items"] == ["boxe.ply", "boxf.ply"]]
    shutil.copy(other / holder["name"], out / "shard-000040.tar")
    for i in range(2):  # re-run as two parts: each removes it (its writer is not running) and renders the rest
        assert main(["render", str(src), "--config", str(cfg), "--out", str(out), "--shard-index", str(i),
                     "--num-shards", "2"]) == 0
    assert keys(out) == expected(src)
    assert check_folder(out)["complete"]


def test_kills_and_reruns_with_any_workers_and_split_never_lose_or_repeat_a_sample(assets, tmp_path):
    rng = random.Random(13)
    src = tmp_path / "assets"
    for i in range(2):
        shutil.copytree(assets, src / f"c{i}", ignore=shutil.ignore_patterns(VICTIM))
    out, cfg = tmp_path / "out", config(tmp_path)
    env = {**os.environ, "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "osmesa")}
    done_before = 0
    for _ in range(4):
        workers, count = rng.choice(["1", "2"]), rng.choice([1, 2, 3])
        index = rng.randrange(count)
        cmd = command(src, out, cfg, "--workers", workers, "--shard-index", str(index), "--num-shards", str(count))
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        goal = done_before + rng.randint(1, 3)  # journaled shards before the kill
        wait_while_running(proc, lambda g=goal: sum(p.read_text().count('"shard"')
                                                    for p in out.glob("journal*.jsonl")) >= g, limit_s=120)
        time.sleep(rng.random() * 0.3)  # anywhere in what comes next: mid-shard, mid-journal line
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done_before = sum(p.read_text().count('"shard"') for p in out.glob("journal*.jsonl"))
        got = keys(out)
        assert len(got) == len(set(got))  # never a sample twice, even between runs
    count = rng.choice([1, 2])
    for index in range(count):
        res = run(command(src, out, cfg, "--workers", "2", "--shard-index", str(index), "--num-shards", str(count)))
        assert res.returncode == 0, res.stderr[-2000:]
    got, want = keys(out), expected(src)
    assert got == want, (sorted(set(want) - set(got)), len(got) - len(set(got)), res.stdout)
    manifest = check_folder(out)
    assert manifest["complete"] and manifest["totals"]["failed"] == 0
    assert not list(out.glob("*.tmp")) and select_part(plan_items(src), 0, 1)
