"""Several Kiln hosts on one machine, for the multi-host test and benchmarks: a PostgreSQL
(a throwaway cluster as .ci/postgres.sh starts one, which a test may restart; KILN_TEST_POSTGRES_URL
where no PostgreSQL is installed), Redis over TCP with an append-only file, moto's S3 server, and
web or worker "hosts", each a process group of its own with its own KILN_HOME, no shared disk, and
only the settings deploy/README.md names. Nothing here runs in a production process.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
import sqlalchemy as sa

from configs import Settings
from worker.db import make_engine, migrate
from worker.live import ROOT, free_port
from worker.procs import kill_session, stop_session
from worker.redis_server import redis_binary

BUCKET, PREFIX = "kiln-topology", "kiln"
# the intervals that bound recovery, shortened as in worker.live (defaults: 5, 60, 30)
FAST = dict(auth_enabled=False, heartbeat_s=0.5, lease_timeout_s=4.0, reconcile_every_s=1.0, progress_every_s=0.2)
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# A host gets the settings deploy/README.md lists for this topology and no other of Kiln's (the rest
# keep their defaults), so a setting the topology needs but the README does not name fails the test;
# besides them, only this test's own choices: no tokens, progress written more often.
HOST_SETTINGS = ("DATABASE_URL", "REDIS_URL", "STORAGE_URL", "KILN_HOME", "KILN_WORKER_NAME", "KILN_HEARTBEAT_S",
                 "KILN_LEASE_TIMEOUT_S", "KILN_RECONCILE_EVERY_S", "KILN_VISIBILITY_TIMEOUT_S")
TEST_SETTINGS = ("KILN_AUTH_ENABLED", "KILN_PROGRESS_EVERY_S")


def _wait(check, what: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:g} s")


def _pg_bin() -> str:
    """The directory of PostgreSQL's initdb and pg_ctl, or "" where none is installed."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin")) if Path("/usr/lib/postgresql").exists() else []
    pg_bin = str(bins[-1]) if bins else str(Path(shutil.which("initdb") or "/nonexistent/initdb").parent)
    return pg_bin if (Path(pg_bin) / "initdb").exists() else ""


class Postgres:
    """A schema of its own in a cluster started here (so that a test can restart the server), or in
    KILN_TEST_POSTGRES_URL's database where no PostgreSQL binaries are installed (not restartable)."""

    def __init__(self, workdir: Path):
        self.workdir, self.cluster, self.schema = workdir, None, "kiln_topo_" + uuid.uuid4().hex[:10]
        self.base = "" if _pg_bin() else os.environ.get("KILN_TEST_POSTGRES_URL", "")

    def start(self) -> str:
        if not self.base:
            self.base = self._start_cluster()
        engine = sa.create_engine(self.base)
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))
        engine.dispose()
        sep = "&" if "?" in self.base else "?"
        return f"{self.base}{sep}options=-csearch_path%3D{self.schema}"

    def _start_cluster(self) -> str:
        pg_bin = _pg_bin()
        if not pg_bin:
            raise RuntimeError("the multi-host test needs PostgreSQL: install it (apt-get install postgresql) "
                               "or set KILN_TEST_POSTGRES_URL")
        data = Path(tempfile.mkdtemp(prefix="kiln-pg."))
        port = free_port()
        run_as = ["su", "postgres", "-c"] if os.geteuid() == 0 else ["bash", "-c"]
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
        subprocess.run(run_as + [f"{pg_bin}/initdb -D {data}/data -A trust -U postgres"], check=True,
                       stdout=subprocess.DEVNULL)
        self.cluster = (run_as, pg_bin, data, port)
        self.start_server()
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    @property
    def restartable(self) -> bool:
        return self.cluster is not None

    def start_server(self) -> None:
        run_as, pg_bin, data, port = self._own()
        subprocess.run(run_as + [f"{pg_bin}/pg_ctl -D {data}/data -o '-k {data} -p {port} -c "
                                 f"listen_addresses=127.0.0.1' -l {data}/log -w start"], check=True,
                       stdout=subprocess.DEVNULL)

    def stop_server(self) -> None:
        """A fast shutdown: open connections are closed, new ones refused until ``start_server``."""
        run_as, pg_bin, data, _ = self._own()
        subprocess.run(run_as + [f"{pg_bin}/pg_ctl -D {data}/data -m fast -w stop"], check=True,
                       stdout=subprocess.DEVNULL)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, leave it down for ``down_s`` seconds, start it again on the same port."""
        self.stop_server()
        time.sleep(down_s)
        self.start_server()

    def _own(self) -> tuple:
        if self.cluster is None:
            raise RuntimeError("only a PostgreSQL cluster started here can be stopped and restarted")
        return self.cluster

    def stop(self) -> None:
        try:
            engine = sa.create_engine(self.base)
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            engine.dispose()
        finally:
            if self.cluster:
                run_as, pg_bin, data, _ = self.cluster
                subprocess.run(run_as + [f"{pg_bin}/pg_ctl -D {data}/data -m fast stop"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                shutil.rmtree(data, ignore_errors=True)


class TcpRedis:
    """redis-server on a TCP port with an append-only file (a restart keeps the queue)."""

    def __init__(self, directory: Path):
        self.directory, self.port, self.proc = directory, free_port(), None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "TcpRedis":
        self.proc = subprocess.Popen([redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.directory), "--appendonly", "yes",
                                      "--appendfsync", "everysec", "--save", ""],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import redis

        _wait(lambda: redis.Redis.from_url(self.url, socket_timeout=1).ping(), "redis", 20, self.proc)
        return self

    def restart(self) -> None:
        """SIGKILL and start again on the same directory (after the last fsync second)."""
        time.sleep(1.2)
        self.stop(signal.SIGKILL)
        self.start()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)


class S3Server:
    """moto's S3 server: a real HTTP S3 endpoint."""

    def __init__(self, log: Path):
        self.port, self.log, self.proc = free_port(), log, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, bucket: str) -> "S3Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: requests.get(self.url, timeout=1) is not None, "moto", 60, self.proc)
        self.client().create_bucket(Bucket=bucket)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


class Host:
    """One web or worker host: its own KILN_HOME, the shared store, broker and bucket."""

    def __init__(self, name: str, home: Path, role: str, settings: Settings, s3_url: str):
        self.name, self.home, self.role, self.settings = name, home, role, settings
        given = {k: v for k, v in settings.env().items() if k in HOST_SETTINGS + TEST_SETTINGS}
        inherited = {k: v for k, v in os.environ.items() if not (k.startswith("KILN_") or k in HOST_SETTINGS)}
        self.env = {**inherited, **given, **S3_ENV, "AWS_ENDPOINT_URL": s3_url,
                    "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        self.port = free_port()
        self.log = home / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Host":
        self.home.mkdir(parents=True, exist_ok=True)
        if self.role == "web":
            cmd = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", "2",
                   "--threads", "4", "--timeout", "60", "web.wsgi:app"]
        else:
            cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_main", "worker", "--pool", "prefork",
                   "--concurrency", "1", "--loglevel", "INFO", "-O", "fair", "--hostname", f"{self.name}@%h"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if self.role == "web":
            _wait(lambda: requests.get(self.url("/health"), timeout=1).ok, f"{self.name} /health", 90, self.proc)
        else:
            _wait(lambda: "ready" in self.log.read_text(errors="replace"), f"{self.name}", 90, self.proc)
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def kill(self) -> None:
        """SIGKILL the host's whole process group (its job process dies with its parent)."""
        kill_session(self.proc)

    def stop(self) -> None:
        stop_session(self.proc, 30)


class Cluster:
    """A web host and two worker hosts on one PostgreSQL, one Redis and one bucket, with a client."""

    def __init__(self, root):
        self.root = root
        self.pg, self.redis, self.s3 = Postgres(root), TcpRedis(root / "redis"), S3Server(root / "moto.log")
        self.hosts: dict[str, Host] = {}

    def start(self) -> "Cluster":
        db_url = self.pg.start()
        self.redis.start()
        self.s3.start(BUCKET)
        for name, role in (("web", "web"), ("worker-a", "worker"), ("worker-b", "worker")):
            home = self.root / name
            s = Settings.for_home(home, redis_url=self.redis.url, database_url=db_url,
                                  storage_url=f"s3://{BUCKET}/{PREFIX}", worker_name=name, **FAST)
            if role == "web":
                migrate(s)
                make_engine(s).dispose()
            self.hosts[name] = Host(name, home, role, s, self.s3.url)
        for host in self.hosts.values():
            host.start()
        return self

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()
        self.redis.stop()
        self.s3.stop()
        self.pg.stop()

    # ------------------------------------------------------------------ client
    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.hosts["web"].url(path), timeout=30, **kw)

    def submit(self, config: dict) -> dict:
        r = requests.post(self.hosts["web"].url("/v1/jobs"), json={"kind": "train", "config": config}, timeout=30)
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        return self.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, done=lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
             timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if done(job):
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id}: {job}\n" + "\n".join(
            h.log.read_text(errors="replace")[-3000:] for h in self.hosts.values()))

    def bucket(self, job_id: str) -> dict[str, bytes]:
        c, prefix = self.s3.client(), f"{PREFIX}/jobs/{job_id}/"
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
        return {k[len(prefix):]: c.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}
