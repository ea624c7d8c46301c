"""Scale-out (issue 7): the Ray executor, independent parts of a plan, resumption across executors.

A Ray head started here (127.0.0.1, its own temporary folder, two CPUs, one for the module) renders the
built-in assets; its samples must equal the local executor's file for file, byte for byte, read back with
plain ``tarfile``. Ray tests skip (with the reason) where Ray is not installed.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trimesh

from tests.waiting import Killer, wait_while_running
from wt_datagen.cli import main
from wt_datagen.inputs.builtin import make_builtin_assets
from wt_datagen.pipeline.executors import select_part
from wt_datagen.pipeline.plan import plan_items

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    head: object  # psutil.Process of `ray start --block`: its descendants are the cluster's services and workers
    env: dict  # environment of a driver (token authentication with the cluster's token)

    def render(self, *args: str, **popen) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "wt_datagen.cli", "render", *args, "--executor", "ray", "--ray-address",
               self.address]
        return subprocess.Popen(cmd, cwd=ROOT, env=self.env, start_new_session=True, **popen)


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head of two CPUs on 127.0.0.1 in a temporary folder; its process tree is killed at the end
    (`ray stop` would stop every Ray instance of the machine, not only this one). Drivers run as child
    processes with the cluster's own token, whatever ~/.ray holds."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    import psutil

    temp = tempfile.mkdtemp(prefix="wtray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
           "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--temp-dir", temp, "--include-dashboard",
           "false", "--disable-usage-stats", "--ray-client-server-port", str(_free_port()),
           "--dashboard-agent-listen-port", str(_free_port())]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    head = psutil.Process(proc.pid)
    try:
        log = []
        for line in proc.stdout:  # up once it says so
            log.append(line)
            if "Ray runtime started" in line:
                break
        assert proc.poll() is None, "ray start failed:\n" + "".join(log[-20:])
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe from filling
        yield Cluster(f"127.0.0.1:{port}", head, env)
    finally:
        procs = [head, *head.children(recursive=True)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    make_builtin_assets(root)
    return root


@pytest.fixture(scope="module")
def many(assets, tmp_path_factory) -> Path:
    """Four copies of the built-in assets (24): work enough to stop a run half-way."""
    root = tmp_path_factory.mktemp("many")
    for i in range(4):
        shutil.copytree(assets, root / f"copy{i}")
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "scale.yaml"
    # two assets a shard (an asset never spans two): several shards, several tasks
    path.write_text(json.dumps({"views": 2, "resolution": 32, "layers": 4, "seed": 3,
                                "shards": {"max_samples": 4}}))
    return path


def _render(assets: Path, out: Path, config: Path, *flags: str) -> int:
    return main(["render", str(assets), "--config", str(config), "--out", str(out), *flags])


def _files(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample's files (``{key: {ext: bytes}}``), read with plain tarfile; a repeated file fails."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext not in samples.setdefault(key, {}), f"{m.name} twice (again in {tar.name})"
                samples[key][ext] = tf.extractfile(m).read()
    return samples


def _check_folder(out: Path) -> dict:
    """The manifest is complete and the folder holds exactly its shards: no temporary or orphan file."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"]
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(s["name"] for s in manifest["shards"])
    assert manifest["totals"]["samples"] == sum(len(tarfile.open(p).getnames()) // 4 for p in out.glob("*.tar"))
    return manifest


def _expected_keys(assets: Path, views: int = 2) -> set[str]:
    keys = set()
    for it in plan_items(assets):
        stem = it.rel_path.replace("/", "__").replace(".", "_")
        keys |= {f"{stem}_v{v:04d}" for v in range(views)}
    return keys


@pytest.fixture(scope="module")
def reference(assets, config, tmp_path_factory) -> dict:
    """The local executor's samples of the built-in assets."""
    out = tmp_path_factory.mktemp("local") / "out"
    assert _render(assets, out, config) == 0
    return _files(out)


# -- parts ---------------------------------------------------------------------------------------------


def test_parts_are_disjoint_cover_the_plan_and_do_not_depend_on_other_items(many):
    items = plan_items(many)
    parts = [select_part(items, i, 5) for i in range(5)]
    assert sorted(it.rel_path for p in parts for it in p) == sorted(it.rel_path for it in items)
    assert all(parts)  # 24 items: every part gets some
    # an item's part is its own: dropping others (another folder listing, --limit) does not move it
    assert select_part(items[::2], 2, 5) == [it for it in parts[2] if it in items[::2]]


def test_three_parts_into_one_folder_make_the_whole_dataset(assets, config, reference, tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(3):
        assert _render(assets, out, config, "--shard-index", str(i), "--num-shards", "3") == 0
        mine = {it.rel_path for it in select_part(plan_items(assets), i, 3)}
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] == (i == 2)
        # its own shards (named for the part) hold exactly its assets
        names = [s for s in manifest["shards"] if s["name"].startswith(f"shard-p{i:05d}of00003-")]
        assert {a for s in names for a in s["items"]} == mine
        assert (out / f"journal-p{i:05d}of00003.jsonl").exists()
    _check_folder(out)
    assert _files(out) == reference
    # a rerun of any part, or of the whole, finds everything done
    capsys.readouterr()
    assert _render(assets, out, config, "--shard-index", "1", "--num-shards", "3") == 0
    assert _render(assets, out, config) == 0
    assert "this run: 0 samples" in capsys.readouterr().out
    assert _files(out) == reference


def test_a_part_without_assets_ends_cleanly(assets, config, tmp_path, capsys):
    items = plan_items(assets)
    empty = next(i for i in range(50) if not select_part(items, i, 50))
    assert _render(assets, tmp_path / "out", config, "--shard-index", str(empty), "--num-shards", "50") == 0
    assert "no assets fall in it" in capsys.readouterr().out
    assert not list((tmp_path / "out").glob("shard-*"))


@pytest.mark.parametrize("flags", [["--shard-index", "3", "--num-shards", "3"], ["--num-shards", "0"],
                                   ["--executor", "ray", "--max-retries", "-1"],
                                   ["--executor", "ray", "--ray-address", "127.0.0.1:1"]])
def test_bad_scale_flags_are_one_line_errors(assets, config, tmp_path, capsys, flags):
    assert _render(assets, tmp_path / "out", config, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("render: --") and "\n" not in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_ray_executor_without_ray_says_how_to_install(assets, config, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    assert _render(assets, tmp_path / "out", config, "--executor", "ray") == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'world-tracing[ray]'" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


# -- Ray -------------------------------------------------------------------------------------------------


def _kill_a_running_task(head, killed: list, driver: subprocess.Popen) -> None:
    """SIGKILL the first worker of the cluster (``head``'s descendants) seen rendering a chunk."""
    import psutil

    while driver.poll() is None:
        for p in head.children(recursive=True):
            try:
                if p.cmdline()[:1] == ["ray::_render_chunk"]:
                    p.kill()
                    killed.append(p.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.02)


def test_ray_gives_the_local_samples_bit_for_bit_even_when_a_task_dies(ray_cluster, assets, config, reference,
                                                                      tmp_path):
    out = tmp_path / "out"
    driver = ray_cluster.render(str(assets), "--config", str(config), "--out", str(out),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = []
    killer = threading.Thread(target=_kill_a_running_task, args=(ray_cluster.head, killed, driver))
    killer.start()
    log = driver.communicate(timeout=300)[0]
    killer.join()
    assert driver.returncode == 0, log[-3000:]
    assert killed, "no task was seen running"
    manifest = _check_folder(out)
    assert manifest["totals"]["rendered"] == 6 and manifest["totals"]["failed"] == 0
    # every shard was written by a task (prefix-run-chunk-attempt); the killed chunk ran again
    names = [s["name"] for s in manifest["shards"]]
    assert all(re.fullmatch(r"shard-r[0-9a-f]{8}-t\d{5}a\d-\d{6}\.tar", n) for n in names), names
    assert any("a1-" in n for n in names), names
    assert _files(out) == reference


def test_a_part_on_ray_writes_its_part_under_its_own_names(ray_cluster, assets, config, reference, tmp_path):
    out = tmp_path / "out"
    driver = ray_cluster.render(str(assets), "--config", str(config), "--out", str(out), "--shard-index", "1",
                                "--num-shards", "3", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, log[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert names and all(re.fullmatch(r"shard-p00001of00003-r[0-9a-f]{8}-t\d{5}a0-\d{6}\.tar", n) for n in names)
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(names)
    assert (out / "journal-p00001of00003.jsonl").exists() and not (out / "journal.jsonl").exists()
    mine = {it.rel_path.replace("/", "__").replace(".", "_") for it in select_part(plan_items(assets), 1, 3)}
    assert _files(out) == {k: v for k, v in reference.items() if k.rsplit("_v", 1)[0] in mine}


def test_ray_run_killed_half_way_resumes_exactly_once(ray_cluster, many, config, tmp_path, capsys):
    out = tmp_path / "out"
    proc = ray_cluster.render(str(many), "--config", str(config), "--out", str(out),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "journal.jsonl"
    wait_while_running(proc, lambda: journal.exists() and journal.read_text().count('"shard"') >= 2, limit_s=150)
    assert proc.poll() is None, "the render ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, mid-run; its job's tasks die with it
    proc.wait()
    assert 2 <= journal.read_text().count('"shard"') < 12  # of 12 (two assets a shard)
    # restarted with the local executor: Ray's journaled shards are kept, its leftovers removed
    capsys.readouterr()
    assert _render(many, out, config) == 0
    stdout = capsys.readouterr().out
    assert "already done" in stdout and "0 failed, 0 not done" in stdout, stdout
    _check_folder(out)
    samples = _files(out)
    assert set(samples) == _expected_keys(many)
    assert all(set(files) == {"rgb.png", "layers.npz", "camera.json", "meta.json"} for files in samples.values())
    names = sorted(p.name for p in out.glob("shard-*.tar"))
    assert any(n.startswith("shard-r") for n in names) and "shard-000000.tar" in names


def test_an_item_that_kills_its_ray_worker_twice_is_failed_and_the_rest_rendered(ray_cluster, assets, config,
                                                                                  reference, tmp_path):
    src = tmp_path / "assets"
    shutil.copytree(assets, src)
    trimesh.creation.icosphere(subdivisions=7).export(src / "victim.ply")  # slow enough to be killed mid-way
    out = tmp_path / "out"
    killer = Killer(out, "victim.ply", 3)  # kills the Ray worker the driver journals it started in
    killer.start()
    driver = ray_cluster.render(str(src), "--config", str(config), "--out", str(out),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = driver.communicate(timeout=300)[0]
    killer.stop = True
    killer.join()
    assert driver.returncode == 0, log[-3000:]
    assert len(killer.killed) == 2  # then it was not started again
    manifest = _check_folder(out)
    status = manifest["assets"]["victim.ply"]
    assert status["status"] == "failed" and status["reason"].startswith("killed its worker process 2 times")
    assert manifest["totals"]["rendered"] == 6
    assert _files(out) == reference  # every other sample exactly once
